"""``raserec embed``: item text -> (LLM step) -> embeddings, plus the training prefixes'
vectors and semantic neighbours, written to a directory (what SRA-CL and GRASP read; they build
the same through the on-disk cache when it is missing).

    raserec embed ../shared/data/Beauty.txt OUT_DIR --embedder minilm [--prefixes]

Writes ``items.npy`` ``[N + 1, D]`` (row = dense item id), ``item_neighbours.npy`` ``[N + 1, k]``,
with ``--prefixes`` also ``prefixes.npy`` ``[P, D]``, ``prefix_pairs.npy`` ``[P, 2]`` (user,
prefix length: rows of the training pairs) and ``prefix_neighbours.npy`` ``[P, k]`` (-1 = none),
each with a manifest, and ``item_texts.jsonl`` (original id, text). Bad input (no item text,
unknown embedder, unreachable endpoint) stops with one ``error:`` line before anything is written
to ``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from raserec.argparsing import ArgumentParser
from raserec.errors import DataError
from raserec.outputs import cache_dir_option, check_output_dir, replacing
from raserec.semantic.embedders import EMBEDDERS, save_checked
from raserec.semantic.generators import make_generator
from raserec.semantic.space import SemanticConfig, SemanticSpace
from raserec.semantic.text import item_text_path

log = logging.getLogger(__name__)

_DEFAULTS = SemanticConfig()


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="raserec embed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="interaction file or prepared directory (e.g. ../shared/data/Beauty.txt)")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.add_argument("--text", default=_DEFAULTS.text_source, help="item text: auto (<data>.items.jsonl), an .items.jsonl, a RecBole "
                   ".item or an Amazon meta_*.json(.gz) file")
    p.add_argument("--generator", default=_DEFAULTS.generator, choices=("template", "precomputed", "openai_compatible"))
    p.add_argument("--generator-path", default=None, help="responses JSONL of the precomputed generator")
    p.add_argument("--base-url", default=None, help="endpoint of the openai_compatible generator")
    p.add_argument("--llm-model", default=None, help="model served at --base-url")
    p.add_argument("--embedder", default=_DEFAULTS.embedder, choices=sorted(EMBEDDERS))
    p.add_argument("--k", type=int, default=_DEFAULTS.k, help="neighbours per item / prefix")
    p.add_argument("--prefixes", action="store_true", help="also the training prefixes' vectors and neighbours")
    p.add_argument("--prefix-vectors", default=_DEFAULTS.prefix_vectors, choices=("text", "mean_items"),
                   help="a prefix's vector: its title list embedded as text, or the mean of its items' vectors "
                   "(configs/*_sracl.yaml and *_grasp.yaml use mean_items)")
    p.add_argument("--prefix-window", type=int, default=_DEFAULTS.prefix_window,
                   help="most recent items of a prefix that make its vector (its text, or the mean of their "
                   "vectors)")
    p.add_argument("--include-same-user", action="store_true",
                   help="let a prefix's neighbours be the same user's shorter prefixes too (never its longer "
                   "ones, which contain its target; the official SRA-CL code excluded only the prefix itself)")
    p.add_argument("--max-len", type=int, default=50, help="data.max_len of the runs that will read this")
    p.add_argument("--cache-dir", default=_DEFAULTS.cache_dir,
                   help="texts, embeddings and neighbours cache ('none': no cache)")
    p.add_argument("--data-cache-dir", default=".cache/datasets",
                   help="prepared-dataset cache, as data.cache_dir ('none': no cache)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    from raserec.data.datamodule import SequenceDataModule
    from raserec.data.prepare import _parse

    args = _parse(_parser(), argv)
    if isinstance(args, int):
        return args
    check_output_dir(args.out_dir, "OUT_DIR")
    cache_dir = cache_dir_option(args.cache_dir, "--cache-dir") or ""  # "": SemanticConfig's "no cache"
    data_cache_dir = cache_dir_option(args.data_cache_dir, "--data-cache-dir")
    if not Path(args.data).exists():
        raise DataError(f"{args.data}: no such file or prepared directory")
    item_text_path(args.text, args.data)  # a missing text file fails here, before the data is read
    config = SemanticConfig(text_source=args.text, generator=args.generator, generator_path=args.generator_path,
                            base_url=args.base_url, llm_model=args.llm_model, embedder=args.embedder, k=args.k,
                            prefix_vectors=args.prefix_vectors, prefix_window=args.prefix_window,
                            exclude_same_user=not args.include_same_user, cache_dir=cache_dir)
    # The generator's own checks (a responses file that is not UTF-8 JSON lines, ...) before the data is read.
    make_generator(config.generator, config.generator_path, config.base_url, config.llm_model)
    dm = SequenceDataModule(args.data, max_len=args.max_len, cache_dir=data_cache_dir)
    space = SemanticSpace(dm, config, progress=not args.no_progress)
    # Everything is computed (and cached) before OUT_DIR is touched.
    outputs = {"items": space.item_vectors, "item_neighbours": space.item_neighbours}
    if args.prefixes:
        train = dm.pairs("train")
        outputs.update(prefixes=space.prefix_vectors, prefix_pairs=np.stack([train.user, train.end], axis=1),
                       prefix_neighbours=space.prefix_neighbours)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    identity = {"semantic": asdict(config), "label": config.label(), "data": str(dm.data_path),
                "content_hash": dm.data.content_hash()}
    for name, matrix in outputs.items():
        save_checked(args.out_dir / f"{name}.npy", matrix, {"key": name, **identity})
    with replacing(args.out_dir / "item_texts.jsonl") as tmp, tmp.open("w") as out:
        for original, text in zip(dm.data.item_ids[1:], space.item_texts[1:], strict=True):
            out.write(json.dumps({"item": str(original), "text": text}) + "\n")
    print(f"wrote {', '.join(f'{k} {list(v.shape)}' for k, v in outputs.items())} to {args.out_dir} "
          f"({config.label()})")
    return 0
