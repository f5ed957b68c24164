"""The configs of the three stages, typed and checked before any rank starts.

Along its seams:

- ``loader``: typed YAML with ``key=value`` overrides, "did you mean", the YAML dump and the
  changed keys of a resume; it knows no stage.
- ``sections``: what more than one stage reads, declared once: the data section (the shards,
  the Z-score the loaders apply), the run's engine settings, the task heads, the metrics.
- ``mdmoco``, ``continual``, ``finetune``, ``multimix``: each stage's schema and its own
  cross-field check.
- ``definitions``: a task's definition from its ``tasks.<name>`` entry, and the rules any
  definition obeys (beside the paper's definitions in ``registry``).
- ``describe`` (``python -m muscle_hpc.config --describe STAGE``): every key, from the source.

The DeepSpeed JSON and the precision live beside the engine that uses them (``ds_engine``).
"""

from muscle_hpc.config.continual import ContinualConfig, check_continual
from muscle_hpc.config.definitions import (
    check_definition,
    check_flips,
    task_definition,
    with_classes,
)
from muscle_hpc.config.finetune import (
    FinetuneConfig,
    FtTask,
    check_finetune,
    check_finetune_task,
)
from muscle_hpc.config.loader import (
    NAME_PATTERN,
    ConfigError,
    changed_keys,
    dump_yaml,
    expand_path,
    load,
    opt,
    to_dict,
)
from muscle_hpc.config.mdmoco import MocoConfig, check_moco, load_config
from muscle_hpc.config.multimix import MultiMixConfig, check_multimix
from muscle_hpc.config.sections import DataConfig, HeadsConfig, MetricsConfig, check_task_batch

# A stage's name (as launch and --describe say it) to its schema.
SCHEMAS = {"mdmoco": MocoConfig, "continual": ContinualConfig, "finetune": FinetuneConfig,
           "multimix": MultiMixConfig}

__all__ = ["NAME_PATTERN", "SCHEMAS", "ConfigError", "ContinualConfig", "DataConfig",
           "FinetuneConfig", "FtTask", "HeadsConfig", "MetricsConfig", "MocoConfig",
           "MultiMixConfig", "changed_keys", "check_continual", "check_definition",
           "check_finetune", "check_finetune_task", "check_flips", "check_moco", "check_multimix",
           "check_task_batch", "dump_yaml", "expand_path", "load", "load_config", "opt",
           "task_definition", "to_dict", "with_classes"]
