"""Data modules: IMDb sentiment classification and enwik8 byte-level language modelling."""

from attnlab.data.enwik8 import Enwik8DataModule
from attnlab.data.imdb import IMDbDataModule

__all__ = ["Enwik8DataModule", "IMDbDataModule"]
