"""The results CSV of a run (docs/training.md): one row per epoch with its losses and metrics, written by train.py
and read by reproduce.py and plot.py, and the epoch a run's selection rule picks."""
import numpy as np

from utils import METRIC_NAMES
from zs_sbir.cli import UserError, first_line

# The seeds' CSV order: precisions first.
CSV_METRICS = (*sorted(METRIC_NAMES, key=lambda name: name.startswith('mAP')), 'precise')

SELECT_KEY = {'test': 'precise', 'heldout': 'heldout_precise'}


def read_results(path):
    """A results CSV of train.py as a pandas DataFrame, and the epoch row its selection rule picked;
    a UserError naming the file when it is not one (unreadable, empty, other columns)."""
    import pandas as pd
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise UserError(f"'{path}' is not a results CSV of train.py ({first_line(error)})") from error
    select_on = frame['select_on'].iloc[-1] if 'select_on' in frame and len(frame) else 'test'
    needed = ['epoch', *METRIC_NAMES, SELECT_KEY.get(select_on, 'precise')]
    if frame.empty or select_on not in SELECT_KEY or any(c not in frame for c in needed):
        raise UserError(f"'{path}' is not a results CSV of train.py: it has no rows, or not the columns "
                        f"epoch, {', '.join(METRIC_NAMES)} and {SELECT_KEY.get(select_on, 'precise')}")
    for column in frame:
        if column in needed or column in METRIC_NAMES or column == 'precise' or column.startswith('heldout_') or \
                column.endswith('_loss'):
            values = pd.to_numeric(frame[column], errors='coerce')
            # losses are empty in the row of a full evaluation (--eval_queries); nothing else may be
            wrong = (values.isna() & frame[column].notna()) | (values.isna() & (column in needed)) | \
                ~np.isfinite(values.fillna(0))
            if wrong.any():
                row = int(wrong.to_numpy().nonzero()[0][0])
                raise UserError(f"'{path}' is not a results CSV of train.py: row {row + 2}, column {column} holds "
                                f"{str(frame[column].iloc[row])!r}, not a number")
            frame[column] = values
    if (frame['epoch'] % 1 != 0).any() or (frame['epoch'] < 0).any():
        raise UserError(f"'{path}' is not a results CSV of train.py: its epochs are not whole numbers")
    frame['epoch'] = frame['epoch'].astype(int)
    # With --eval_queries the epochs were scored on a sample of the queries (eval_queries = its size) and
    # the selected epoch again on all of them, in a last row with eval_queries 'all': that row is reported.
    full = frame['eval_queries'].astype(str) == 'all' if 'eval_queries' in frame else pd.Series(True, frame.index)
    epochs = frame if full.all() else frame[~full]
    best = epochs.loc[epochs[SELECT_KEY[select_on]].idxmax()]
    final = frame[full & (frame['epoch'] == best['epoch'])] if not full.all() else epochs.loc[[best.name]]
    return epochs, (final.iloc[-1] if len(final) else best)


def results_row(epoch, losses, metrics, select_on, eval_queries='all'):
    """One row of the results CSV: the epoch, its losses, its metrics (and the held-out and GZS ones it has)."""
    extra = [f'{kind}_{name}' for kind in ('heldout', 'gzs') for name in CSV_METRICS if f'{kind}_{name}' in metrics]
    return {'epoch': epoch, **losses, **{name: metrics[name] for name in (*CSV_METRICS, *extra)},
            'eval_queries': eval_queries, 'select_on': select_on}
