"""FFCV loaders over converted shards (see ``data_prep.convert``)."""

from .loaders import TaskLoader, TwoViewLoader
from .shards import Shard, ShardError, open_shard, pretrain_shards

__all__ = ["Shard", "ShardError", "TaskLoader", "TwoViewLoader", "open_shard",
           "pretrain_shards"]
