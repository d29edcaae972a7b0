"""Write a trained network for other tools: a diffusers folder, or guided-diffusion's .pt.

  python scripts/export.py --model_path runs/exp/ema_0.9999_200000.pt --format diffusers --output my-pipeline/
  python scripts/export.py --model_path runs/exp/ema_0.9999_200000.pt --format guided-diffusion --output model.pt
  python scripts/export.py --model_path runs/vit/ema.pt --format diffusers --dit_frequency_fix --output my-dit/

The network and its diffusion come from the run's config.yaml beside the checkpoint (or --arch /
--config / flags), as for sample.py. diffusers, a UNet: unet/ (UNet2DModel) and scheduler/
(DDPMScheduler), loadable with DDPMPipeline.from_pretrained / UNet2DModel.from_pretrained. diffusers,
a ViT: transformer/ (DiTTransformer2DModel) and scheduler/; diffusers' DiT embeds the timestep at
other frequencies than ours (DiT's), so a ViT is refused unless --dit_frequency_fix accepts a folder
that computes it only once the loader sets them (dkdm does; others: README, Export). Either folder
is a dkdm teacher again (--teacher_path my-pipeline/). guided-diffusion (UNets): the state dict, and
<stem>.flags.json with the flags its scripts need (printed too). What a format cannot represent is
refused, naming why.
"""

import os
import sys

from dkdm.config import ConfigParser, DiffusionConfig, ModelConfig
from dkdm.models import ViT, export
from dkdm.resolve import resolve

FORMATS = ("diffusers", "guided-diffusion")


def main(argv: list[str]) -> None:
    parser = ConfigParser(__doc__, {"model": ModelConfig, "diffusion": DiffusionConfig})
    parser.add_argument("--model_path", required=True, help="our checkpoint (modelNNNNNN.pt or ema_*.pt)")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--output", required=True, help="a folder (diffusers) or a .pt path (guided-diffusion)")
    parser.add_argument(
        "--dit_frequency_fix",
        action="store_true",
        help="diffusers, a ViT: write the DiTTransformer2DModel folder although it computes this network only "
        "once every block's norm1.emb.time_proj.downscale_freq_shift is set to 0 after loading (dkdm does it; "
        "config.json records it); without the flag a ViT is refused",
    )
    args = parser.parse(argv)
    path, fmt, output = args.extras["model_path"], args.extras["format"], args.extras["output"]
    fix = args.extras["dit_frequency_fix"]
    net = resolve(args.overrides["model"], args.overrides["diffusion"], checkpoint=path)
    model = net.build().eval()
    if fix and (fmt != "diffusers" or not isinstance(model, ViT)):
        raise ValueError(
            "--dit_frequency_fix applies to a ViT exported to diffusers only; this is "
            f"{'a ' + type(model).__name__ if fmt == 'diffusers' else 'the ' + fmt + ' format'}: drop the flag"
        )
    if fmt == "diffusers":
        if os.path.exists(output) and os.listdir(output):
            raise ValueError(f"{output} exists and is not empty; give a new folder")
        note = export.export_diffusers(
            model, net.model, net.diffusion, output, source=os.path.abspath(path), dit_frequency_fix=fix
        )
        if not isinstance(model, ViT):
            print(f"wrote {output}: unet/ (UNet2DModel) and scheduler/ (DDPMScheduler) from {path}")
        else:
            print(f"wrote {output}: transformer/ (DiTTransformer2DModel) and scheduler/ (DDPMScheduler) from {path}")
            print(
                "note: after DiTTransformer2DModel.from_pretrained, set norm1.emb.time_proj.downscale_freq_shift = 0 "
                "in every block (dkdm --teacher_path does); without it the timestep frequencies are not this network's"
            )
            if "unconditional_label" in note:
                print(f"note: unconditional: pass class_labels {note['unconditional_label']} (a zero embedding)")
    else:
        info = export.export_guided_diffusion(model, net.model, net.diffusion, output)
        print(f"wrote {output} and {os.path.splitext(output)[0]}.flags.json; guided-diffusion flags:")
        print(info["command_line"])
        for note in info["notes"]:
            print(f"note: {note}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, ExportError are ValueErrors
        print(f"export.py: error: {e}", file=sys.stderr)
        sys.exit(1)
