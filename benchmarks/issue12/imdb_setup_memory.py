# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12); run from the repo root
with .venv/bin/python. Kept as it was run."""

import resource, gc


def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


def hwm():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


import torch, attnlab.data.imdb as imdb

print(f"imports: rss {rss():.0f} hwm {hwm():.0f}")
dm = imdb.IMDbDataModule(
    data_dir="/work/shared/data/imdb", max_len=512, cache_dir="/root/.cache/attnlab"
)
raw = dm._load_raw()
print(f"load_raw: rss {rss():.0f} hwm {hwm():.0f}")
dm._prepare_tokenizer()
print(f"tokenizer: rss {rss():.0f} hwm {hwm():.0f}")
dm.setup("fit")
print(f"setup fit: rss {rss():.0f} hwm {hwm():.0f}")
dm.setup("test")
print(f"setup test: rss {rss():.0f} hwm {hwm():.0f}")
gc.collect()
print(f"gc: rss {rss():.0f} hwm {hwm():.0f}")
