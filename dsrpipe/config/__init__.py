"""The pipeline YAML, validated once at the edge: everything past `load_pipeline` is typed.

schema.py holds the bounds and base types, sections.py the sections and `Pipeline`, methods/ the
sparse-training methods (one module each: its options, its sparsifier and its hooks), loading.py
safe YAML and `--set`.
"""

from ..names import SAFE_NAME
from ..safeyaml import parse_yaml, read_yaml
from .loading import (
    apply_overrides,
    first_error,
    flat_settings,
    load_pipeline,
    parse_pipeline,
    path_settings,
    section_settings,
)
from .methods import (
    METHOD_OPTIONS,
    MethodOptions,
    parse_method_options,
    register_method,
    switch_method,
    unregister_method,
)
from .sections import (
    ClusterConfig,
    DataConfig,
    DistributedConfig,
    ExportConfig,
    FinetuneConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    Pipeline,
    ValidateConfig,
)

__all__ = [
    "METHOD_OPTIONS",
    "SAFE_NAME",
    "ClusterConfig",
    "DataConfig",
    "DistributedConfig",
    "ExportConfig",
    "FinetuneConfig",
    "LogConfig",
    "MethodOptions",
    "ModelConfig",
    "OptimConfig",
    "Pipeline",
    "ValidateConfig",
    "apply_overrides",
    "first_error",
    "flat_settings",
    "load_pipeline",
    "parse_method_options",
    "parse_pipeline",
    "parse_yaml",
    "path_settings",
    "read_yaml",
    "register_method",
    "section_settings",
    "switch_method",
    "unregister_method",
]
