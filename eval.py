"""Evaluate a checkpoint on a dataset's validation split: prints top-1 / top-5 / loss.

    python eval.py --model resnet8x4 --ckpt runs/cifar100/res32x4_res8x4/best.pt --data data/cifar100
    python eval.py --config configs/demo/crld.yaml --ckpt runs/demo/crld_seed0/best.pt
    python eval.py --model resnet32x4 --ckpt checkpoints/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth \
        --dataset cifar100 --data data/cifar100

Any checkpoint `load_model_weights` accepts works (this project's, `{"model": sd}`, bare state dicts), and
torchvision's pretrained weights for the torchvision architectures (training/hub_weights.py):
    python eval.py --model imagenet_resnet34 --dataset imagenet --data data/imagenet --ckpt torchvision:IMAGENET1K_V1
"""
from common.cpus import spin_briefly

spin_briefly()  # before torch loads OpenMP, which reads its settings once
import argparse
import sys

import torch

from common.files import check_writable, save_json_atomic
from pipelines import val_loader
from training.checkpoint import load_model_weights
from training.cli import run_main
from training.config import load_config
from training.loop import evaluate
from training.models import create_model
from training.runtime import autocast_for, cpu_threads, dist_from_env, resolve_device


def main(argv=None):
    ap = argparse.ArgumentParser(description="evaluate a checkpoint",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", help="YAML config for data / pipeline settings")
    ap.add_argument("--model", help="model name (default: the config's model.name)")
    ap.add_argument("--ckpt", required=True, help="checkpoint file, or torchvision:<weights member> (e.g. DEFAULT)")
    ap.add_argument("--data", help="dataset root (data.root)")
    ap.add_argument("--dataset", help="data.dataset (cifar100, imagenet, demo, ...)")
    ap.add_argument("--num-classes", type=int)
    ap.add_argument("--pipeline", help="data backend")
    ap.add_argument("--json", help="also write the metrics to this file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    over = []
    for flag, key in ((args.model, "model.name"), (args.data, "data.root"), (args.dataset, "data.dataset"),
                      (args.num_classes, "data.num_classes"), (args.pipeline, "pipeline.name")):
        if flag is not None:
            over.append(f"{key}={flag}")
    if args.dataset == "cifar10" and args.num_classes is None:
        over.append("data.num_classes=10")
    if args.dataset in ("imagenet", "imagefolder") and args.num_classes is None:
        over += ["data.num_classes=1000", "data.image_size=224", "data.val_resize=256"]
    if args.dataset == "tiny_imagenet" and args.num_classes is None:
        over += ["data.num_classes=200", "data.image_size=64"]
    cfg = load_config(args.config, over + list(args.overrides) + ["method.name=ce"])  # the user's word last
    if args.json:
        check_writable(args.json)
    device = resolve_device(cfg.run.device, dist_from_env())
    with cpu_threads(cfg, device):  # the split train.py applies, before any thread pool starts
        model = create_model(cfg.model.name, cfg.data.num_classes)
        load_model_weights(model, args.ckpt, cfg.model.name, "--ckpt")  # before the data: a bad --ckpt fails fast
        val, src = val_loader(cfg, device)
        model.to(device, memory_format=torch.channels_last)
        metrics = evaluate([model], val, device, autocast_for(cfg.run.amp, device)[0])[0]
    print(f"{cfg.model.name} on {cfg.data.dataset} ({len(src)} images): top-1 {metrics['val_top1']:.2f}  "
          f"top-5 {metrics['val_top5']:.2f}  loss {metrics['val_loss']:.4f}")
    if args.json:
        save_json_atomic(args.json, {"model": cfg.model.name, "ckpt": args.ckpt, **metrics})
    return metrics


if __name__ == "__main__":
    sys.exit(run_main(main))
