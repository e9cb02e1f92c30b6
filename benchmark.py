"""The old name of reproduce.py, kept so that existing scripts and notes keep working: `python benchmark.py ARGS` is
`python reproduce.py ARGS`."""
import runpy
from pathlib import Path

if __name__ == '__main__':
    runpy.run_path(str(Path(__file__).with_name('reproduce.py')), run_name='__main__')
