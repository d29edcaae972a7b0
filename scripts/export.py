"""Write a trained UNet for other tools: a diffusers pipeline folder, or guided-diffusion's .pt.

  python scripts/export.py --model_path runs/exp/ema_0.9999_200000.pt --format diffusers --output my-pipeline/
  python scripts/export.py --model_path runs/exp/ema_0.9999_200000.pt --format guided-diffusion --output model.pt

The network and its diffusion come from the run's config.yaml beside the checkpoint (or --arch /
--config / flags), as for sample.py. diffusers: unet/ (UNet2DModel) and scheduler/ (DDPMScheduler),
loadable with DDPMPipeline.from_pretrained / UNet2DModel.from_pretrained, and by dkdm as a teacher
(--teacher_path my-pipeline/). guided-diffusion: the state dict, and <stem>.flags.json with the flags
its scripts need (printed too). What a format cannot represent is refused, naming why.
"""

import os
import sys

from dkdm.config import ConfigParser, DiffusionConfig, ModelConfig
from dkdm.models import export
from dkdm.resolve import resolve

FORMATS = ("diffusers", "guided-diffusion")


def main(argv: list[str]) -> None:
    parser = ConfigParser(__doc__, {"model": ModelConfig, "diffusion": DiffusionConfig})
    parser.add_argument("--model_path", required=True, help="our checkpoint (modelNNNNNN.pt or ema_*.pt)")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--output", required=True, help="a folder (diffusers) or a .pt path (guided-diffusion)")
    args = parser.parse(argv)
    path, fmt, output = args.extras["model_path"], args.extras["format"], args.extras["output"]
    net = resolve(args.overrides["model"], args.overrides["diffusion"], checkpoint=path)
    model = net.build().eval()
    if fmt == "diffusers":
        if os.path.exists(output) and os.listdir(output):
            raise ValueError(f"{output} exists and is not empty; give a new folder")
        export.export_diffusers(model, net.model, net.diffusion, output, source=os.path.abspath(path))
        print(f"wrote {output}: unet/ (UNet2DModel) and scheduler/ (DDPMScheduler) from {path}")
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
