"""What an editing run does: the methods, one editing configuration (:class:`EditSpec`) and a run's
settings (:class:`EditConfig`, what the CLI builds and the Prefect flows take).

The paper's edit ("shift", Section 7): for an edit (prompt, target) take x_n, the input of one FF2 matrix
at the last prompt position, and add eta * x_n^T E[t] to the matrix, E[t] the unembedding row of the
target's first token. The baseline "sgd" takes one true gradient step on the same matrix,
W -= lr * dL/dW with L the NLL of target_new's first token at the last position.

Step-size variants of the shift (``step``):

* ``fixed``       eta as given (the paper's recipe; lr column = eta).
* ``normalized``  eta = c / (|x_n|^2 |E[t]|^2): the edit prompt's residual gets c * E[t]/|E[t]|^2, so the
                  target's logit moves by ~c (times the final norm's gain) whatever the layer's
                  activation scale (lr column = c).
* ``minimal``     the smallest eta (doubling, then bisection on the edit prompt alone) that makes
                  target_new the argmax, times a margin factor (lr column = the margin). A search that
                  never reaches the target stores ``converged = false`` (kept out of edit_summary's means).

Baseline "rome" (``blens.edit.rome``): ROME's rank-one update of the same matrix with ROME's published
hyper-parameters; it has no step size (lr column NULL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import BaseModel, Field

from blens.extract.adapters import ModelView
from blens.extract.config import DEFAULT_WAREHOUSE
from blens.extract.registry import EMBEDDED_NAME

# The CLI builds its options from this module to render --help: it must stay torch-free (no blens.extract.models,
# no .fluency); tests/test_cli_help.py checks it.
Method = Literal["none", "shift", "sgd", "rome"]
Step = Literal["fixed", "normalized", "minimal"]
METHODS: tuple[str, ...] = get_args(Method)
STEPS: tuple[str, ...] = get_args(Step)
MATRIX = "ff2"  # the matrix every method edits (the paper's FF2)
STATS_LIMIT = 1000  # records of the text sample for ROME's C (EasyEdit layout: 3,000 prompts, ~30,000 tokens)
TRAIN_FILE = "counterfact-train.json"


@dataclass(frozen=True)
class EditSpec:
    """One editing configuration: which method, where, how big a step."""

    method: str  # none | shift | sgd | rome
    layer: int | None = None
    lr: float | None = None  # shift: eta (fixed) / c (normalized) / margin (minimal); sgd: learning rate; rome: None
    step: str = "fixed"  # shift only

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.step not in STEPS:
            raise ValueError(f"step must be one of {', '.join(STEPS)}, got {self.step!r}")
        if self.method != "shift" and self.step != "fixed":
            raise ValueError(f"step {self.step!r} applies to method 'shift' only")
        if self.method == "rome":
            if self.layer is None or self.lr is not None:
                raise ValueError("method 'rome' needs a layer and takes no learning rate (ROME's own hyper-parameters)")
            return
        if self.method != "none" and (self.layer is None or self.lr is None):
            raise ValueError(f"method {self.method!r} needs a layer and a learning rate")
        if self.method != "none" and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr!r}")

    @property
    def label(self) -> str:
        """The ``method`` column: the paper's shift is 'shift'; variants are 'shift-normalized' etc."""
        if self.method == "shift" and self.step != "fixed":
            return f"shift-{self.step}"
        return self.method

    def as_dict(self) -> dict:
        return {"method": self.method, "layer": self.layer, "lr": self.lr, "step": self.step}


def check_layer(view: ModelView, layer: int | None) -> None:
    """Up-front check for the CLI: a clear error naming the valid range."""
    if layer is not None and not (0 <= layer < view.n_layers):
        raise ValueError(f"layer {layer} is out of range: the model has {view.n_layers} layers (0..{view.n_layers - 1})")


class EditConfig(BaseModel):
    """One editing run: which records, which specs, where the rows go. ``kind`` 'edit' reports on held-out
    data; 'sweep' tunes on the train split and then picks defaults (``min_efficacy``)."""

    model: str = EMBEDDED_NAME
    data: str
    specs: list[EditSpec]
    warehouse: str = DEFAULT_WAREHOUSE
    limit: int | None = Field(default=None, ge=1)
    device: str = "auto"
    batch_size: int = Field(default=16, ge=1)
    kind: Literal["edit", "sweep"] = "edit"
    min_efficacy: float = Field(default=0.95, ge=0, le=1)
    # Fluency (blens.edit.fluency): greedy new tokens per prompt (ROME: 100 sampled tokens; short so that an
    # edit stays cheap on CPU); 0 = not measured (column NULL).
    fluency_tokens: int = Field(default=30, ge=0)
    # ROME's key statistics C = E[k k^T] (blens.edit.rome): CounterFact records whose prompts, paraphrases and
    # neighbourhood prompts are the text sample; None = counterfact-train.json beside ``data`` if it exists,
    # else ``data`` itself. Only read when a spec is 'rome'.
    stats_data: str | None = None
    stats_limit: int = Field(default=STATS_LIMIT, ge=1)


class SweepConfig(EditConfig):
    """A tuning run (`blens sweep`): an :class:`EditConfig` with the defaults of a sweep. 100 train edits (enough
    to rank the grid's cells, ~13 min for SmolLM2's grid on a busy 2-core machine), 8 edits per task, and no
    fluency (the selection rule does not use it, and it costs a generation per cell)."""

    kind: Literal["edit", "sweep"] = "sweep"
    limit: int | None = Field(default=100, ge=1)
    batch_size: int = Field(default=8, ge=1)
    fluency_tokens: int = Field(default=0, ge=0)
