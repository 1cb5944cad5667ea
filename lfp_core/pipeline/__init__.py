"""The precompute pipeline's stage implementations (one module per stage family).

The stages are declared, in order, in :mod:`lfp_core.stages` (importable without torch); this
package holds the functions they run and the :class:`Context` they share.
"""

from __future__ import annotations

from lfp_core.pipeline.core import Context
from lfp_core.stages import STAGES, StageSpec, describe_stages, stage_names, stages_for

__all__ = ["STAGES", "Context", "StageSpec", "describe_stages", "stage_names", "stages_for"]
