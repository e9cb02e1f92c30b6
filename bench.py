"""The old name of speed.py, kept so that existing scripts and notes keep working: `python bench.py ARGS` is
`python speed.py ARGS`."""
import runpy
from pathlib import Path

if __name__ == '__main__':
    runpy.run_path(str(Path(__file__).with_name('speed.py')), run_name='__main__')
