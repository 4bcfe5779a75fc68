"""Manifests for the zoo's models, written as a site would write its own."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from zoo import ZooModel, write

AI = {"scheme": "DCM", "value": "123110", "meaning": "Artificial Intelligence"}
CATEGORY = {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"}
RV = {"scheme": "SCT", "value": "53085002", "meaning": "Right ventricle"}
MYO = {"scheme": "SCT", "value": "49848007", "meaning": "Left Ventricle Myocardium"}
LV = {"scheme": "SCT", "value": "87878005", "meaning": "Left ventricle"}
# ACDC / nnU-Net Task027 label order: 1 RV cavity, 2 LV myocardium, 3 LV cavity.
ACDC_LABELS = [{"value": 1, "name": "RV cavity", "category": CATEGORY, "type": RV},
               {"value": 2, "name": "LV myocardium", "category": CATEGORY, "type": MYO},
               {"value": 3, "name": "LV cavity", "category": CATEGORY, "type": LV}]
CHEXNET_CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                   "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
                   "Pleural_Thickening", "Hernia"]
IMAGENET = {"kind": "mean_std", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _tensor(spec: Any) -> dict:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype, "layout": spec.layout}


def install(model: ZooModel, folder: Path, name: str, task: str, normalization: Any,
            **sections: Any) -> Path:
    """Write NAME.onnx and NAME.yaml into ``folder``; returns the manifest path."""
    onnx_path = write(model, folder, name)
    manifest = {
        "name": name, "version": "0.0.1", "family": AI,
        "description": f"test zoo model {name}", "intended_use": "tests only",
        "onnx": onnx_path.name, "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "task": task, "inputs": [_tensor(s) for s in model.inputs],
        "outputs": [_tensor(s) for s in model.outputs], "normalization": normalization,
        "quality": {}, "training": {}, **sections,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path
