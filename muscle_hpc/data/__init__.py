"""FFCV loaders over converted shards (see ``data_prep.convert``)."""

from .loaders import MEAN, STD, TaskLoader, TwoViewLoader
from .shards import Shard, ShardError, open_shard, pretrain_shards

__all__ = ["MEAN", "STD", "Shard", "ShardError", "TaskLoader", "TwoViewLoader", "open_shard",
           "pretrain_shards"]
