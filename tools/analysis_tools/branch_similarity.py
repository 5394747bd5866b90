"""Branch similarity of OREPA models: how alike the branches' contributions
to each squeezed kernel are, layer by layer (the paper's analysis of the
scaling layers: without them the branches grow alike).

    python tools/analysis_tools/branch_similarity.py CONFIG CHECKPOINT [CONFIG CHECKPOINT ...] \\
        [--labels LABEL ...] [--out-dir DIR]

For each (config, training checkpoint) pair it builds the model, loads the
checkpoint strictly and computes, for every OREPA layer with two or more
branches, the cosine similarity of every pair of branch contributions
(``orepa_mm.branch_similarity``).  It writes ``branch_similarity.json``
(every layer's matrix), ``branch_similarity.md`` (per checkpoint: layers,
mean, min, max of the per-layer mean cosine; then per layer) and
``branch_similarity.png`` (mean cosine against layer depth, one line per
checkpoint) in ``--out-dir``.  Give two checkpoints to compare them, e.g. a
model trained with and one without the scaling layers.  During training,
``custom_hooks=[dict(type='BranchSimilarityHook')]`` records the same mean.
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from orepa_mm.branch_similarity import layer_similarities, mean_similarity  # noqa: E402
from orepa_mm.checkpoint import atomic_write, atomic_write_text, extract_state_dict, load_checkpoint_file  # noqa: E402
from orepa_mm.cli import EXIT_STATUS_HELP, ToolError, log, tool_main  # noqa: E402
from orepa_mm.config import build_model, load_config  # noqa: E402

PROG = 'branch_similarity'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0], epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('pairs', nargs='+', metavar='CONFIG CHECKPOINT', help='config and checkpoint, repeated')
    parser.add_argument('--labels', nargs='+', default=None, help='a name per pair (default: checkpoint names)')
    parser.add_argument('--out-dir', default=osp.join('work_dirs', 'branch_similarity'))
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        raise ToolError(f'give CONFIG CHECKPOINT pairs; got {len(args.pairs)} paths')
    args.pairs = [tuple(args.pairs[i:i + 2]) for i in range(0, len(args.pairs), 2)]
    for config, checkpoint in args.pairs:
        for what, path in (('config', config), ('checkpoint', checkpoint)):
            if not osp.isfile(path):
                raise ToolError(f'{what} not found: {path}')
    if args.labels is None:
        args.labels = [osp.splitext(osp.basename(ckpt))[0] for _, ckpt in args.pairs]
        if len(set(args.labels)) < len(args.labels):
            args.labels = [f'{i}: {label}' for i, label in enumerate(args.labels)]
    elif len(args.labels) != len(args.pairs):
        raise ToolError(f'--labels: {len(args.labels)} labels for {len(args.pairs)} checkpoints')
    return args


def measure(config: str, checkpoint: str) -> List[Dict[str, Any]]:
    """The per-layer records of the model of ``config`` with the weights of ``checkpoint``."""
    with warnings.catch_warnings():  # the frameworks' import-time deprecation warnings
        warnings.simplefilter('ignore')
        cfg = load_config(config)
        model = build_model(cfg)
    state = extract_state_dict(load_checkpoint_file(checkpoint), checkpoint)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ToolError(f'{checkpoint} does not match {config}: {len(result.missing_keys)} missing keys '
                        f'(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected '
                        f'(e.g. {result.unexpected_keys[:2]}); is it a fused checkpoint?')
    records = layer_similarities(model)
    if not records:
        raise ToolError(f'{config}: the model has no OREPA layer with two or more branches')
    return records


def markdown(results: Dict[str, List[Dict[str, Any]]]) -> str:
    lines = ['| checkpoint | OREPA layers | mean cosine | min | max |', '|---|---|---|---|---|']
    for label, records in results.items():
        means = [r['mean_cosine'] for r in records]
        lines.append(f'| {label} | {len(records)} | {mean_similarity(records):.3f} | {min(means):.3f} | '
                     f'{max(means):.3f} |')
    labels = list(results)
    layers = list(dict.fromkeys(r['layer'] for records in results.values() for r in records))
    by_layer = {label: {r['layer']: r['mean_cosine'] for r in records} for label, records in results.items()}
    lines += ['', '| layer | ' + ' | '.join(labels) + ' |', '|---|' + '---|' * len(labels)]
    for layer in layers:
        cells = [f'{by_layer[label][layer]:.3f}' if layer in by_layer[label] else '' for label in labels]
        lines.append(f'| {layer} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def plot(results: Dict[str, List[Dict[str, Any]]], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, records in results.items():
        ax.plot(range(1, len(records) + 1), [r['mean_cosine'] for r in records], marker='o', markersize=3,
                label=f'{label} (mean {mean_similarity(records):.3f})')
    ax.set_xlabel('OREPA layer (depth order)')
    ax.set_ylabel('mean cosine similarity of branch pairs')
    ax.axhline(0, color='grey', linewidth=0.5)
    ax.legend()
    ax.set_title('Branch similarity per layer')
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


@tool_main(PROG)
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    results: Dict[str, List[Dict[str, Any]]] = {}
    for label, (config, checkpoint) in zip(args.labels, args.pairs):
        log(f'{label}: {checkpoint}')
        results[label] = measure(config, checkpoint)
    out = {label: dict(config=config, checkpoint=checkpoint, mean_cosine=mean_similarity(records), layers=records)
           for label, (config, checkpoint), records in zip(args.labels, args.pairs, results.values())}
    atomic_write_text(osp.join(args.out_dir, 'branch_similarity.json'), json.dumps(out, indent=1))
    table = markdown(results)
    atomic_write_text(osp.join(args.out_dir, 'branch_similarity.md'), table)
    plot(results, osp.join(args.out_dir, 'branch_similarity.png'))
    print(table)
    log(f'wrote branch_similarity.json, .md and .png in {args.out_dir}')


if __name__ == '__main__':
    sys.exit(main())
