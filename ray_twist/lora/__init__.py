"""LoRA factors as data: PEFT adapter dirs read and written as (A, B) factors per module, and
per-row LoRA (every row of a batch its own adapter) as forward hooks on a plain model.

    peft_io   PEFT adapter dir <-> `AdapterFactors` ({module: (A, B·scaling)} + config), and
              `apply_adapter`: one adapter for every row, through PEFT
    rows      `RowFactors`, `RowAdapters` and the `row_lora` hooks that apply them, each
              row its own adapter
"""

from ray_twist.lora.peft_io import (
    AdapterFactors,
    AdapterFormatError,
    apply_adapter,
    check_lora,
    load_weights,
    lora_factors,
    read_adapter,
    read_config,
    write_adapter,
)
from ray_twist.lora.rows import (
    MODES,
    ROW_MODES,
    Mode,
    RowAdapters,
    RowFactors,
    RowLoRA,
    RowMode,
    adapter_rows,
    concat_rows,
    per_row_factors,
    row_lora,
)

__all__ = [
    "MODES",
    "ROW_MODES",
    "Mode",
    "RowMode",
    "AdapterFactors",
    "AdapterFormatError",
    "RowAdapters",
    "RowFactors",
    "RowLoRA",
    "adapter_rows",
    "apply_adapter",
    "check_lora",
    "concat_rows",
    "load_weights",
    "lora_factors",
    "per_row_factors",
    "read_adapter",
    "read_config",
    "row_lora",
    "write_adapter",
]
