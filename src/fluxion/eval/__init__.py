"""GenEval-style evaluation on the shapes world: a geometric detector, GenEval's scoring rules, reports."""

from fluxion.eval.detect import Detection, DetectorConfig, background_name, detect
from fluxion.eval.report import contact_sheet, format_table, run_eval, write_report
from fluxion.eval.score import (
    TAGS,
    color_binding,
    evaluate,
    is_held_out_entry,
    load_spec,
    relative_position,
    score_entry,
    summarize,
)

__all__ = [
    "TAGS", "Detection", "DetectorConfig", "background_name", "color_binding", "contact_sheet", "detect", "evaluate",
    "format_table", "is_held_out_entry", "load_spec", "relative_position", "run_eval", "score_entry",
    "summarize", "write_report",
]
