"""Reporting a validation score to NNI from inside a Lightning module (shared by the dense-prediction tasks)."""
from __future__ import annotations

import math

import nni


class ReportScoreToNNI:
    """Lightning-module mixin: inside an NNI trial (``hparams.report_to_nni``), report a validation score in %
    after each epoch and the last one as the final result at the end of fitting (the counterpart of
    :class:`retia.evaluators.classification.ReportTop1ToNNI` for metrics the module computes itself: mIoU,
    keypoint AP). The module calls :meth:`_report_score` with each epoch's value as a fraction; NaN is skipped."""

    _last_score_percent: float | None = None

    def _in_trial(self) -> bool:
        return bool(self.hparams.report_to_nni) and nni.get_current_parameter() is not None

    def _report_score(self, fraction: float) -> None:
        if math.isnan(fraction):
            return
        self._last_score_percent = 100.0 * fraction
        if self._in_trial():
            nni.report_intermediate_result(self._last_score_percent)

    def on_fit_end(self):
        if self._last_score_percent is not None and self._in_trial():
            nni.report_final_result(self._last_score_percent)
