"""Why the study samples without classifier-free guidance: a probe on validation seeds only.

1. Base generators (this run's and an earlier ``--base-cache`` file): classifier accuracy on 16 samples per known
   class at DDIM 20 / 50 steps and guidance 1 / 3 / 6 (sampling seed 5).
2. DreamBooth on ``to_q`` + ``to_k`` (SingLoRA r=16, LoRA r=8) at lr 1e-2 / 3e-2 / 1e-1, training seed 100:
   the classifier's labels of 64 'a photo of sks sneaker' samples at guidance 1 and 3 (sampling seed 7).

None of these seeds is a measurement seed of run.py (0, 1, 2 -> sampling seeds 1000+ / 2000+).
Run: ``nice -n 10 .venv/bin/python studies/dreambooth_fashion/probe_guidance.py /tmp/dbf/base3000.pt /tmp/db_base.pt``
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

spec = importlib.util.spec_from_file_location("dreambooth_fashion_run", Path(__file__).with_name("run.py"))
study = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = study
spec.loader.exec_module(study)


def base_accuracy(unet, text, classifier, steps: int, guidance: float, per_class: int = 16) -> dict:
    """Overall and per-class classifier accuracy on samples of the 9 known class prompts."""
    known = [c for c in range(10) if c != 9]
    labels = torch.tensor(known).repeat_interleave(per_class)
    with torch.no_grad():
        uncond, cond = text.embed([""]), text.embed([study.class_prompt(int(c)) for c in labels])
        predicted = classifier(study.sample(unet, cond, uncond, steps=steps, guidance=guidance, seed=5)).argmax(1)
    return {"steps": steps, "guidance": guidance, "accuracy": round(float((predicted == labels).float().mean()), 3),
            "per_class": [round(float((predicted[labels == c] == c).float().mean()), 2) for c in known]}


def main() -> None:
    torch.set_num_threads(1)
    config = study.StudyConfig()
    data = study.load_fashion_mnist(config.image_size)
    classifier, _ = study.train_classifier(data, config.classifier_epochs, config.classifier_train_size)
    bases = [study.load_base(config, torch.load(path, weights_only=True)) for path in sys.argv[1:]]
    for path, (unet, text) in zip(sys.argv[1:], bases):
        for steps in (20, 50):
            for guidance in (1.0, 3.0, 6.0):
                print(json.dumps({"base": path, **base_accuracy(unet, text, classifier, steps, guidance)}), flush=True)
    unet, text = bases[0]
    generator = torch.Generator().manual_seed(1234)  # the instance images of run.py
    indices = (data["train_y"] == config.subject_class).nonzero().flatten()
    instances = data["train_x"][indices[torch.randperm(len(indices), generator=generator)[: config.n_instance]]]
    with torch.no_grad():
        uncond, subject = text.embed([""]), text.embed([study.subject_prompt(config)]).expand(64, -1, -1)
    for method, r in (("singlora", 16), ("lora", 8)):
        for lr in (1e-2, 3e-2, 1e-1):
            adapted, *_ = study.dreambooth(unet, text, instances, method, r, lr, study.TARGETS["qk"], config, 100)
            for guidance in (1.0, 3.0):
                with torch.no_grad():
                    images = study.sample(adapted, subject, uncond, steps=20, guidance=guidance, seed=7)
                    counts = np.bincount(classifier(images).argmax(1).numpy(), minlength=10).tolist()
                print(json.dumps({"method": method, "r": r, "lr": lr, "guidance": guidance,
                                  "subject_accuracy": counts[config.subject_class] / 64, "label_counts": counts}),
                      flush=True)


if __name__ == "__main__":
    main()
