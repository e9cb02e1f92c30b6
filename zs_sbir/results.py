"""The results CSV of a run (docs/training.md): one row per epoch with its losses and metrics, written by train.py
and read by reproduce.py and plot.py, and the epoch a run's selection rule picks."""
import numpy as np

from utils import CONVENTIONS, FINE_GRAINED_NAMES, METRIC_NAMES, metric_name
from zs_sbir.cli import UserError, first_line

# The seeds' CSV order (precisions first), in SAKE's convention (the plain names), then in torchmetrics'.
CSV_METRICS = tuple(metric_name(name, convention) for convention in CONVENTIONS
                    for name in (*sorted(METRIC_NAMES, key=lambda name: name.startswith('mAP')), 'precise'))
# How --select_on picks the best epoch: by `precise` on the unseen test classes (the seeds' way), or on held-out
# images of the seen classes; in the run's metric convention.
SELECT_ON = ('test', 'heldout')
# With --gzs: how many seen sketches and photos joined the test set, and how many the protocol asks for
GZS_POOL = tuple(f'gzs_{kind}_{domain}' for kind in ('seen', 'protocol') for domain in ('sketches', 'photos'))


def selection_key(select_on, convention='sake'):
    """The column a run maximises to pick its best epoch."""
    return ('heldout_' if select_on == 'heldout' else '') + metric_name('precise', convention)


def read_results(path):
    """A results CSV of train.py as a pandas DataFrame, and the epoch row its selection rule picked;
    a UserError naming the file when it is not one (unreadable, empty, other columns)."""
    import pandas as pd
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise UserError(f"'{path}' is not a results CSV of train.py ({first_line(error)})") from error
    select_on = frame['select_on'].iloc[-1] if 'select_on' in frame and len(frame) else 'test'
    convention = frame['metric_convention'].iloc[-1] if 'metric_convention' in frame and len(frame) else 'sake'
    key = selection_key(select_on, convention) if convention in CONVENTIONS else 'precise'
    needed = ['epoch', *(metric_name(name, convention) for name in METRIC_NAMES), key]
    if frame.empty or select_on not in SELECT_ON or convention not in CONVENTIONS or any(c not in frame for c in needed):
        raise UserError(f"'{path}' is not a results CSV of train.py: it has no rows, or not the columns "
                        f"epoch, {', '.join(needed[1:])}")
    for column in frame:
        if column in needed or column in CSV_METRICS or column.startswith(('heldout_', 'gzs_', 'fg_')) or \
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
    best = epochs.loc[epochs[key].idxmax()]
    final = frame[full & (frame['epoch'] == best['epoch'])] if not full.all() else epochs.loc[[best.name]]
    return epochs, (final.iloc[-1] if len(final) else best)


def results_row(epoch, losses, metrics, args, eval_queries='all'):
    """One row of the results CSV: the epoch, its losses, its metrics in both conventions (and the held-out, GZS
    and fine-grained ones it has), and how the run is scored and selected (train.py's `args`)."""
    extra = [f'{kind}_{name}' for kind in ('heldout', 'gzs') for name in CSV_METRICS if f'{kind}_{name}' in metrics]
    extra += [f'fg_{name}' for name in FINE_GRAINED_NAMES if f'fg_{name}' in metrics]
    extra += [name for name in GZS_POOL if name in metrics]
    return {'epoch': epoch, **losses, **{name: metrics[name] for name in (*CSV_METRICS, *extra)},
            'eval_queries': eval_queries, 'select_on': args.select_on, 'metric_convention': args.metric_convention,
            'val_classes': args.val_classes}
