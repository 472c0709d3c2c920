"""Regenerates the README's quickstart output from a real run.

    python scripts/readme_output.py             # trains + evaluates, rewrites
    python scripts/readme_output.py --no-train  # evaluates an existing workdir

Runs the quickstart's two commands (training `configs/digits.py` into
--workdir, then `python -m mixmo_jax.evaluate`), times the training, and
replaces everything between the README's markers

    <!-- quickstart-output:begin -->
    <!-- quickstart-output:end -->

with a sentence naming this machine (CPU model, cores, jax version), the
training time and the evaluation's printed table, so the README shows what
today's code prints, never hand-edited numbers.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN = '<!-- quickstart-output:begin -->'
END = '<!-- quickstart-output:end -->'


class MarkerError(ValueError):
  """The README lacks the begin / end markers (or has them out of order)."""


def machine_description() -> str:
  """'a 2-core Intel(R) Xeon(R) ... CPU machine (Linux, jax 0.10.2)'."""
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  try:
    import jax
    version = f', jax {jax.__version__}'
  except ImportError:
    version = ''
  return (f'a {os.cpu_count()}-core {model} CPU machine '
          f'({platform.system()}{version})')


def format_seconds(seconds: float) -> str:
  minutes, secs = divmod(int(round(seconds)), 60)
  return f'{minutes} min {secs} s' if minutes else f'{secs} s'


def render_block(eval_text: str, seconds: float, epochs: int, steps: int,
                 devices: int, machine: str) -> str:
  """The markdown between the markers (markers included)."""
  return (f'{BEGIN}\n'
          f'On {machine} the first command trains for '
          f'{format_seconds(seconds)} ({epochs} epochs, {steps} steps, '
          f'{devices} CPU devices) and `evaluate` prints:\n\n'
          f'```\n{eval_text.rstrip()}\n```\n'
          f'{END}')


def rewrite(readme: str, block: str) -> str:
  """`readme` with the text between the markers replaced by `block`."""
  start, end = readme.find(BEGIN), readme.find(END)
  if start < 0 or end < start:
    raise MarkerError(f'README has no {BEGIN} ... {END} block; add both '
                      'markers where the quickstart output goes')
  return readme[:start] + block + readme[end + len(END):]


def _run(argv):
  done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                        check=False)
  if done.returncode:
    sys.stderr.write(done.stdout + done.stderr)
    raise SystemExit(f'error: exit code {done.returncode}: {" ".join(argv)}')
  return done.stdout


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python scripts/readme_output.py')
  parser.add_argument('--workdir', default='/tmp/mixmo_digits')
  parser.add_argument('--readme', default=os.path.join(REPO, 'README.md'))
  parser.add_argument('--train', default=True,
                      action=argparse.BooleanOptionalAction,
                      help='train first (default); --no-train reuses workdir')
  parser.add_argument(
      '--eval_output', default=None,
      help="a file holding the evaluation's printed output "
      '(skips both commands; with --seconds)')
  parser.add_argument('--seconds', type=float, default=None,
                      help='training time, with --eval_output or --no-train')
  args = parser.parse_args(argv)
  seconds = args.seconds
  if args.eval_output:
    with open(args.eval_output) as f:
      eval_text = f.read()
  else:
    if args.train:
      if os.path.exists(args.workdir):  # A resumed run would time nothing.
        raise SystemExit(f'readme_output: {args.workdir} exists: remove it '
                         'to train from scratch, or pass --no-train')
      start = time.perf_counter()
      _run([
          sys.executable, '-m', 'mixmo_jax.main', '--config=configs/digits.py',
          f'--workdir={args.workdir}'
      ])
      seconds = time.perf_counter() - start
    eval_text = _run([
        sys.executable, '-m', 'mixmo_jax.evaluate', f'--workdir={args.workdir}'
    ])
  with open(os.path.join(args.workdir, 'config.json')) as f:
    config = json.load(f)
  with open(os.path.join(args.workdir, 'eval_history.jsonl')) as f:
    history = [json.loads(line) for line in f if line.strip()]
  steps = history[-1]['step'] if history else 0
  if seconds is None:
    parser.error('--seconds is needed when nothing is trained')
  block = render_block(eval_text, seconds, config['num_epochs'], steps,
                       config.get('cpu_devices') or 1, machine_description())
  with open(args.readme) as f:
    readme = f.read()
  try:
    new = rewrite(readme, block)
  except MarkerError as e:
    print(f'error: {args.readme}: {e}', file=sys.stderr)
    return 1
  with open(args.readme, 'w') as f:
    f.write(new)
  print(f'rewrote the quickstart output in {args.readme}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
