"""Pipelines: series in, result datasets out.

The table of contents.  A route names a pipeline; these are the built-in
ones, imported only when first used (their imports are heavy and the
receiver never needs them).  A site adds its own as a package entry point in
the ``dicom_node.pipelines`` group (``name = "package.module:Class"``), or by
decorating the class with :func:`register`; either way the class says what
it needs of a model (``check_model``) and what it reports (``plausible``).

- ``ct_denoise``: low-dose CT denoising (derived CT series + noise/SNR/CNR SR)
- ``cardiac_seg``: cardiac MRI short-axis segmentation (SEG + function SR + SC)
- ``cxr_triage``: chest X-ray normality triage (SR + heat-map SC)
"""

from dicom_node.pipelines.base import (Pipeline, PipelineInput, PipelineResult, StageTimer, check_pair,
                                       get_pipeline, pipeline_names, register)

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "Pipeline", "PipelineInput", "PipelineResult", "StageTimer",
           "check_pair", "get_pipeline", "pipeline_names", "register"]

# name -> "module:Class"
BUILTIN = {
    "ct_denoise": "dicom_node.pipelines.ct_denoise:CtDenoise",
    "cardiac_seg": "dicom_node.pipelines.cardiac_seg:CardiacSeg",
    "cxr_triage": "dicom_node.pipelines.cxr_triage:CxrTriage",
}
ENTRY_POINT_GROUP = "dicom_node.pipelines"
