"""The `fluxion` command: generate, info, quantize, train, eval."""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import time
from pathlib import Path

from .files import check_writable

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
QUANTIZE_AT_LOAD = ["int8", "w8a8", "fp8", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
GGUF_TYPES = ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "f16", "bf16", "f32"]


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _pipeline_class(args, model: str):
    """The pipeline a `generate` call needs, from its image flags and the model's channel layout."""
    from . import pipelines as P

    config = Path(model) / "transformer" / "config.json"
    layout = json.loads(config.read_text()) if config.is_file() else {}
    in_ch, out_ch = layout.get("in_channels", 64), layout.get("out_channels") or layout.get("in_channels", 64)
    if args.reference:
        return P.FluxKontextPipeline
    if args.controlnet:
        return (P.FluxControlNetInpaintPipeline if args.mask else P.FluxControlNetImg2ImgPipeline if args.image
                else P.FluxControlNetPipeline)
    if args.control_image:
        return P.FluxControlPipeline
    if in_ch > 2 * out_ch or (args.mask and in_ch != out_ch):
        return P.FluxFillPipeline
    if args.mask:
        return P.FluxInpaintPipeline
    if args.image:
        return P.FluxImg2ImgPipeline
    return P.FluxPipeline


def _image_arguments(args) -> dict:
    """The call's image arguments, each file read (and checked) before any model loads."""
    from .images import load_image

    kw, record = {}, {}
    if args.mask and not args.image:
        raise ValueError("--mask needs --image (the picture to repaint)")
    if args.control and not args.control_image:
        raise ValueError("--control canny needs --control-image (the picture to take edges from)")
    if args.controlnet and not args.control_image:
        raise ValueError("--controlnet needs --control-image (the structure image the ControlNet follows)")
    if (args.control_mode or args.controlnet_scale) and not args.controlnet:
        raise ValueError("--control-mode and --controlnet-scale need --controlnet")
    for path in args.controlnet or []:
        if not Path(path).exists():
            raise ValueError(f"--controlnet {path}: no such file or folder")
    if args.strength is not None and not args.image:
        raise ValueError("--strength needs --image")
    if (args.max_area is not None or args.keep_reference_size) and not args.reference:
        raise ValueError("--max-area and --keep-reference-size need --reference (Kontext)")
    if bool(args.redux_image) != bool(args.redux_model):
        raise ValueError("--redux-image needs --redux-model DIR (a FLUX.1 Redux folder), and --redux-model needs "
                         "--redux-image")
    if args.redux_image:
        if not Path(args.redux_model).is_dir():
            raise ValueError(f"--redux-model {args.redux_model}: no such folder")
        kw["_redux_images"] = [load_image(p, "--redux-image") for p in args.redux_image]
        record["redux_image"] = list(args.redux_image)
        record["redux_model"] = args.redux_model
    if args.image:
        kw["image"] = load_image(args.image, "--image")
        record["image"] = args.image
    if args.mask:
        kw["mask_image"] = load_image(args.mask, "--mask")
        record["mask_image"] = args.mask
    if args.strength is not None:
        kw["strength"] = args.strength
    if args.control_image:
        control = load_image(args.control_image, "--control-image")
        if args.control == "canny":
            from .control import canny

            control = canny(control, args.canny_low, args.canny_high)
            record["control"] = f"canny:{args.canny_low}:{args.canny_high}"
        kw["control_image"] = control if len(args.controlnet or []) < 2 else [control] * len(args.controlnet)
        record["control_image"] = args.control_image
    if args.controlnet:
        record["controlnet"] = list(args.controlnet)
        if args.control_mode:
            kw["control_mode"] = args.control_mode if len(args.control_mode) > 1 else args.control_mode[0]
        if args.controlnet_scale:
            kw["controlnet_conditioning_scale"] = (args.controlnet_scale if len(args.controlnet_scale) > 1
                                                   else args.controlnet_scale[0])
    if args.reference:
        kw["image"] = load_image(args.reference, "--reference")
        record["reference"] = args.reference
        if args.max_area is not None:
            kw["max_area"] = args.max_area
        if args.keep_reference_size:
            kw["_auto_resize"] = False
    if args.regional:
        prompts, masks = [], []
        for spec in args.regional:
            prompt, sep, mask = spec.rpartition("=")
            if not sep or not prompt:
                raise ValueError(f"--regional takes PROMPT=MASK.png, got {spec!r}")
            prompts.append(prompt)
            masks.append(load_image(mask, "--regional mask"))
        kw.update(regional_prompts=prompts, regional_masks=masks, regional_base_ratio=args.regional_base_ratio)
        if args.regional_steps is not None:
            kw["regional_steps"] = args.regional_steps
        record["regional_masks"] = [spec.rpartition("=")[2] for spec in args.regional]
    return kw, record


FLAGS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "true_cfg_scale": "--true-cfg",
         "num_images_per_prompt": "--num-images", "max_sequence_length": "--max-sequence-length",
         "height": "--height", "width": "--width", "strength": "--strength", "cache_threshold": "--cache-threshold",
         "regional_base_ratio": "--regional-base-ratio", "regional_steps": "--regional-steps", "max_area": "--max-area"}


@contextlib.contextmanager
def _named_as_flags():
    """A pipeline's ValueError names its Python argument; on the command line, name the flag too."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        for name, flag in FLAGS.items():
            if text.startswith(name + " "):
                raise ValueError(f"{flag}: {text}") from None
        raise


def cmd_generate(args) -> int:
    from .pipelines import default_model_dir

    model = args.model or str(default_model_dir())
    out = check_writable(args.out, "--out", ".png")  # before the model loads, not after the image is made
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.max_memory is not None and not 0 < args.max_memory < float("inf"):
        raise ValueError(f"--max-memory must be a positive number of GiB, got {args.max_memory}")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    if args.regional and (args.image or args.reference or args.control_image):
        raise ValueError("--regional works with text-to-image only (no --image, --reference or --control-image)")
    if args.parallel and args.regional:
        raise ValueError("--regional does not work with --parallel (its attention mask is not sharded)")
    rank = _init_parallel(args.parallel) if args.parallel else 0
    try:
        return _generate(args, model, out, rank)
    finally:
        if args.parallel:
            import torch.distributed as dist

            dist.destroy_process_group()


def _init_parallel(mode: str) -> int:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); returns this process's rank."""
    import os

    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"--parallel {mode} runs under torchrun (e.g. `torchrun --nproc-per-node 2 -m fluxion.cli "
                         f"generate ... --parallel {mode}`): {', '.join(missing)} not set")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def _generate(args, model: str, out: Path, rank: int) -> int:
    import torch

    from .pipelines.guidance import parse
    from .png import save_png

    guidance = parse(args.guidance_schedule) if args.guidance_schedule else args.guidance
    true_cfg = parse(args.true_cfg_schedule) if args.true_cfg_schedule else args.true_cfg
    images, record = _image_arguments(args)
    cls = _pipeline_class(args, model)
    takes = inspect.signature(cls.generate).parameters
    for flag, name, value in (("--negative-prompt", "negative_prompt", args.negative_prompt),
                              ("--true-cfg", "true_cfg_scale", true_cfg)):
        if value is not None and name not in takes:  # Fill and Control take no negative prompt (as diffusers)
            raise ValueError(f"{flag} does not apply to {cls.__name__} (its models run without true CFG)")
        if value is not None:
            images[name] = value
    extra = {"quantize": args.quantize} if args.quantize else {}
    if args.controlnet:
        extra["controlnet"] = _load_controlnets(args.controlnet, _torch_dtype(args.dtype))
    pipe = cls.from_pretrained(model, torch_dtype=_torch_dtype(args.dtype), compute_dtype=args.compute_dtype, **extra)
    if args.control_lora:
        pipe.load_lora_weights(args.control_lora)
    if args.max_memory is not None:
        _limit_memory(pipe, Path(model) / "transformer", args.max_memory)
    if args.parallel:  # every rank runs the same call with the same seed; the transformer shards the tokens
        import torch.distributed as dist

        from .distributed import ContextParallelConfig

        degree = {f"{args.parallel}_degree": dist.get_world_size()}
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(**degree))
    n = args.num_images
    t0 = time.perf_counter()
    prompt, redux = args.prompt, images.pop("_redux_images", None)
    if redux:  # the Redux prior, with this model's text encoders: the prompt and the images become the embeddings
        from .pipelines.redux import FluxPriorReduxPipeline

        prior = FluxPriorReduxPipeline.from_pretrained(
            args.redux_model, torch_dtype=_torch_dtype(args.dtype),
            **{k: getattr(pipe, k) for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})
        images.update(prior(redux, prompt=args.prompt))
        prompt = None
        record["prompt"] = args.prompt
    with _named_as_flags():
        result = pipe(
            prompt=prompt,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            num_images_per_prompt=n,
            max_sequence_length=args.max_sequence_length,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            cache=args.cache,
            cache_threshold=args.cache_threshold,
            **images,
        )
    seconds = time.perf_counter() - t0
    if rank != 0:  # under --parallel every rank holds the same images: rank 0 alone writes them
        return 0
    compute = str(pipe.compute_plans["transformer"].compute).replace("torch.", "")
    if args.parallel:
        record = {**record, "parallel": f"{args.parallel}x{torch.distributed.get_world_size()}"}
    for i, (image, params) in enumerate(zip(result.images, result.parameters)):
        path = out if n == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        save_png(image, path, {**params, **record, "seed": args.seed, "image_index": i, "dtype": args.dtype,
                               "compute_dtype": compute})
        print(f"wrote {path} ({image.width}x{image.height})")
    print(f"{seconds:.2f} s for {n} image{'s' if n > 1 else ''} (model loaded)")
    return 0


def _load_controlnets(paths: list[str], dtype):
    """One ControlNet per --controlnet (a diffusers folder, or one file: XLabs or InstantX); several are summed."""
    from .model.controlnet import FluxControlNetModel, FluxMultiControlNetModel

    nets = [FluxControlNetModel.from_pretrained(p, torch_dtype=dtype) if Path(p).is_dir()
            else FluxControlNetModel.from_single_file(p, torch_dtype=dtype) for p in paths]
    return nets[0] if len(nets) == 1 else FluxMultiControlNetModel(nets)


def _limit_memory(pipe, transformer_dir: Path, gib: float) -> None:
    """--max-memory: text encoders and transformer give their mapped pages back after running (model offload);
    if the transformer's files alone exceed the budget, its blocks are streamed too (sequential offload)."""
    size = sum(f.stat().st_size for f in transformer_dir.glob("*") if f.suffix in (".safetensors", ".gguf"))
    if size > gib * 2**30:
        pipe.enable_sequential_cpu_offload()
        print(f"transformer files {size / 2**30:.1f} GiB > --max-memory {gib:g} GiB: streaming its blocks")
    else:
        pipe.enable_model_cpu_offload()


def cmd_quantize(args) -> int:
    from .checkpoints import quantize_to_gguf

    check_writable(args.dst, "quantize's destination", ".gguf")
    t0 = time.perf_counter()
    plan = quantize_to_gguf(args.src, args.dst, args.type.upper())
    counts: dict[str, int] = {}
    for qtype in plan.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    size = Path(args.dst).stat().st_size
    print(f"wrote {args.dst} ({size / 2**30:.2f} GiB, {time.perf_counter() - t0:.1f} s): "
          + ", ".join(f"{n} tensors {t}" for t, n in sorted(counts.items())))
    return 0


def cmd_info(args) -> int:
    from .checkpoints import inspect_checkpoint

    if args.system:
        from .compute import system_report

        print(system_report())
        if args.path is None:
            return 0
    if args.path is None:
        raise SystemExit("fluxion info: give a checkpoint path, or --system")
    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: FLUX {info['part']}, {info['format']}")
    if "variant" in info:
        print(f"  variant: {info['variant']}")
    print(f"  parameters: {info['parameters']:,} ({info['bytes'] / 2**30:.2f} GiB stored)")
    print("  dtypes: " + ", ".join(f"{k} {v:,}" for k, v in info["dtypes"].items()))
    print("  config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    return 0


def _add_run_arguments(p: argparse.ArgumentParser, exported: str) -> None:
    """The options every config-driven training command shares (train, train-controlnet, distill)."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--until", type=int, default=None, metavar="STEP",
                   help="stop (with a checkpoint) at this step; rerun with changed --set values to go on from it")
    p.add_argument("--export-only", action="store_true", help=f"export the last checkpoint's {exported}, do not train")


def _run_options(args) -> dict:
    """`trainer.train`'s run options from `_add_run_arguments`' flags."""
    return dict(resume=not args.fresh, max_minutes=args.max_minutes, export_only=args.export_only, until=args.until)


def cmd_train(args) -> int:
    from .train.config import load_config
    from .train.trainer import train

    train(load_config(args.config, args.set), **_run_options(args))
    return 0


def cmd_distill(args) -> int:
    from .train.config import load_config
    from .train.trainer import train

    cfg = load_config(args.config, args.set + ([f"method={args.method}"] if args.method else []))
    if cfg.kind != "distill":
        raise ValueError(f"{args.config}: a distillation config has kind 'distill', got {cfg.kind!r}")
    train(cfg, **_run_options(args))
    return 0


def cmd_train_controlnet(args) -> int:
    from .train.config import load_controlnet_config
    from .train.trainer import train

    train(load_controlnet_config(args.config, args.set), **_run_options(args))
    return 0


def cmd_train_lora(args) -> int:
    from .train.lora import LoraTrainConfig, train_lora

    fields = LoraTrainConfig.__dataclass_fields__
    cfg = LoraTrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    train_lora(cfg, resume=not args.fresh, max_minutes=args.max_minutes)
    return 0


def cmd_eval(args) -> int:
    from .eval.run import parse_steps, run_eval, run_steps_sweep
    from .pipelines.guidance import parse

    if args.true_cfg_schedule is not None:
        if args.true_cfg is not None:
            raise ValueError("give --true-cfg (one scale) or --true-cfg-schedule (a scale over the steps), not both")
        parse(args.true_cfg_schedule)  # a bad spec fails here, before the model loads
        args.true_cfg = args.true_cfg_schedule  # the pipeline takes the spec as it is; results.json records it

    if args.probe is not None:
        from .eval.probe import run_probe

        if args.steps_sweep is not None or args.quantize or args.cache or args.limit is not None or args.seeds != 1:
            raise ValueError("--probe generates its own prompts; it takes --steps, --guidance and --true-cfg, not "
                             "--steps-sweep, --limit, --seeds, --quantize or --cache (--probe-seeds sets its seeds)")
        run_probe(args.probe, args.model, out_dir=args.out, bases=args.probe_bases, seeds=args.probe_seeds,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, true_cfg_scale=args.true_cfg)
        return 0
    if args.steps_sweep is not None:
        if args.steps is not None or args.quantize or args.cache:
            raise ValueError("--steps-sweep sets the steps itself; it takes --guidance and --true-cfg, not --steps, "
                             "--quantize or --cache")
        run_steps_sweep(args.model, parse_steps(args.steps_sweep), out_dir=args.out, limit=args.limit,
                        seeds=args.seeds, guidance_scale=args.guidance, true_cfg_scale=args.true_cfg)
        return 0
    run_eval(args.model, out_dir=args.out, limit=args.limit, steps=args.steps, guidance=args.guidance,
             cache=args.cache, cache_threshold=args.cache_threshold, quantize=args.quantize, true_cfg=args.true_cfg,
             seeds=args.seeds)
    return 0


def cmd_bench(args) -> int:
    from .eval.speed import run_bench

    if args.vs_diffusers:  # the peer runs in the repo's bench script: fluxion itself never imports diffusers
        import subprocess

        script = Path(__file__).resolve().parents[2] / "bench" / "speed.py"
        if not script.is_file():
            raise ValueError(f"{script}: not found; --vs-diffusers needs a source checkout (bench/speed.py)")
        threads = ["--threads", str(args.threads)] if args.threads else []
        return subprocess.call([sys.executable, str(script), *threads, "--repeats", str(args.repeats)])

    print(run_bench(args.model, _torch_dtype(args.dtype), args.threads, args.repeats, args.cache_threshold, args.size))
    return 0


def _serve_count(text: str) -> int:
    """argparse type for `serve --workers` / `--replica-threads`: an integer >= 1 (argparse names the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def cmd_serve(args) -> int:
    from .serve.config import ServeConfig

    config = ServeConfig(  # checked before anything loads: a non-loopback host needs --api-key or --insecure
        model=args.model, host=args.host, port=args.port, lora_dir=args.lora_dir, api_key=args.api_key,
        insecure=args.insecure, max_queue=args.max_queue, max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms, max_pixels=args.max_pixels, max_steps=args.max_steps, max_n=args.max_n,
        job_ttl_s=args.job_ttl, request_timeout_s=args.request_timeout, lora_cache=args.lora_cache,
        preview_every=args.preview_every, quantize=args.quantize,
        dtype=DTYPES[args.dtype] if args.dtype else None, workers=args.workers, replica_threads=args.replica_threads)
    from .serve.app import serve

    serve(config)
    return 0


def _add_cache_arguments(parser) -> None:
    parser.add_argument("--cache", choices=["fbcache"], default=None,
                        help="step caching: skip the later blocks of steps whose first block barely changed")
    parser.add_argument("--cache-threshold", dest="cache_threshold", type=float, default=None,
                        help="fbcache threshold (relative change of the first block's residual; 0.1-0.3 usual)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxion", description="FLUX.1 text-to-image: generate, inspect, train, evaluate.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its one line")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image from a prompt")
    g.add_argument("prompt")
    g.add_argument("--model", help="diffusers-layout model folder (default: the shipped fluxion-mini)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    g.add_argument("--guidance", type=float, default=None, help="distilled guidance scale (dev-style models)")
    g.add_argument("--guidance-schedule", dest="guidance_schedule", default=None, metavar="SPEC",
                   help="distilled guidance over the steps: linear:START:END, cosine:START:END, step:HIGH:LOW[:AT], "
                        "constant:V (fluxion.pipelines.guidance)")
    g.add_argument("--true-cfg-schedule", dest="true_cfg_schedule", default=None, metavar="SPEC",
                   help="true CFG scale over the steps, same forms as --guidance-schedule")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--true-cfg", type=float, default=None,
                   help="true CFG scale (> 1 with a negative prompt; default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--max-sequence-length", type=int, default=None)
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the weights' storage dtype")
    g.add_argument("--compute-dtype", dest="compute_dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the dtype layers compute in (auto: bf16 only on CPUs with bf16 units; fluxion.compute)")
    g.add_argument("--quantize", choices=QUANTIZE_AT_LOAD, default=None,
                   help="quantize the transformer's Linear layers while loading (less memory; see fluxion.quant)")
    g.add_argument("--out", default="out.png")
    im = g.add_argument_group("image conditioning (the pipeline follows from these flags and the model)")
    im.add_argument("--image", default=None, help="img2img: the starting picture (with --mask: the one to repaint)")
    im.add_argument("--strength", type=float, default=None, help="img2img/inpainting: how much to change, (0, 1]")
    im.add_argument("--mask", default=None, help="inpainting / Fill: white = repaint")
    im.add_argument("--control-image", dest="control_image", default=None,
                    help="Control models: the structure image (a depth map, or a picture with --control canny)")
    im.add_argument("--control", choices=["canny"], default=None, help="make the control image: Canny edges")
    im.add_argument("--canny-low", dest="canny_low", type=int, default=50)
    im.add_argument("--canny-high", dest="canny_high", type=int, default=200)
    im.add_argument("--control-lora", dest="control_lora", default=None,
                    help="a Canny/Depth control LoRA file for a 64-channel base model")
    im.add_argument("--controlnet", action="append", default=None, metavar="PATH",
                    help="a ControlNet (diffusers folder, or an XLabs / InstantX file) following --control-image; "
                         "repeat to sum several")
    im.add_argument("--control-mode", dest="control_mode", type=int, action="append", default=None,
                    help="Union ControlNets: the control mode (one, or one per --controlnet)")
    im.add_argument("--controlnet-scale", dest="controlnet_scale", type=float, action="append", default=None,
                    help="controlnet_conditioning_scale (one, or one per --controlnet)")
    im.add_argument("--reference", default=None, help="Kontext: the image to edit")
    im.add_argument("--max-area", dest="max_area", type=int, default=None,
                    help="Kontext: output pixels (default 1024*1024; --height/--width set only the aspect ratio)")
    im.add_argument("--keep-reference-size", dest="keep_reference_size", action="store_true",
                    help="Kontext: keep the reference's own size instead of the nearest preferred (~1 MP) one")
    im.add_argument("--redux-image", dest="redux_image", action="append", default=None, metavar="IMG",
                    help="FLUX.1 Redux: an image prompt (repeat to sum several); needs --redux-model")
    im.add_argument("--redux-model", dest="redux_model", default=None, metavar="DIR",
                    help="FLUX.1 Redux folder (image_encoder/, feature_extractor/, image_embedder/ or "
                         "flux1-redux-dev.safetensors)")
    im.add_argument("--regional", action="append", default=None, metavar="PROMPT=MASK.png",
                    help="a regional prompt and its mask (white = its region); repeat per region")
    im.add_argument("--regional-base-ratio", dest="regional_base_ratio", type=float, default=0.2)
    im.add_argument("--regional-steps", dest="regional_steps", type=int, default=None)
    g.add_argument("--max-memory", dest="max_memory", type=float, default=None, metavar="GIB",
                   help="memory budget in GiB: release each part's memory-mapped weights after it runs, and stream "
                        "the transformer block by block when its files are larger than the budget (applies to "
                        "weights used as stored: GGUF, fp8, or --dtype matching the file)")
    _add_cache_arguments(g)
    g.add_argument("--parallel", choices=["ulysses", "ring"], default=None,
                   help="sequence-parallel over the processes of `torchrun --nproc-per-node N` (gloo on CPU, nccl "
                        "on CUDA); rank 0 writes the image")
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("quantize", help="write a transformer checkpoint as a GGUF file")
    q.add_argument("src", help="transformer checkpoint: original .safetensors, diffusers folder, fp8 or GGUF file")
    q.add_argument("dst", help="the .gguf file to write")
    q.add_argument("--type", default="q8_0", choices=GGUF_TYPES, help="GGML type of the large weights (default q8_0)")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("info", help="describe a checkpoint file or folder")
    i.add_argument("path", nargs="?")
    i.add_argument("--json", action="store_true")
    i.add_argument("--system", action="store_true",
                   help="describe this machine: CPU capability, bf16 units, the compute dtype chosen and why")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config")
    _add_run_arguments(t, "weights")
    t.set_defaults(func=cmd_train)

    tc = sub.add_parser("train-controlnet", help="train a ControlNet for a FLUX model from a YAML config "
                                                  "(kind: controlnet; configs/mini-controlnet*.yaml)")
    tc.add_argument("config")
    _add_run_arguments(tc, "net")
    tc.set_defaults(func=cmd_train_controlnet)

    di = sub.add_parser("distill", help="distil a FLUX model from a YAML config (kind: distill): --method guidance "
                                        "makes a dev-style student (one forward a step instead of true CFG's two); "
                                        "--method reflow a few-step, CFG-free one from cached teacher pairs; "
                                        "--method adversarial the same with LADD's adversarial loss on the "
                                        "teacher's features")
    di.add_argument("config")
    di.add_argument("--method", choices=["guidance", "reflow", "adversarial"], default=None, help="override the config's method")
    _add_run_arguments(di, "student")
    di.set_defaults(func=cmd_distill)

    lo = sub.add_parser("train-lora", help="DreamBooth-style LoRA training on a folder of images")
    lo.add_argument("--model", default=None, help="base model folder (default: fluxion-mini)")
    lo.add_argument("--data", required=True, help="images with .txt captions, or a metadata.jsonl")
    lo.add_argument("--instance-prompt", dest="instance_prompt", help="caption for images that have none")
    lo.add_argument("--output", required=True)
    lo.add_argument("--rank", type=int)
    lo.add_argument("--alpha", type=float)
    lo.add_argument("--lr", type=float)
    lo.add_argument("--steps", type=int)
    lo.add_argument("--batch-size", dest="batch_size", type=int)
    lo.add_argument("--grad-accum", dest="grad_accum", type=int)
    lo.add_argument("--resolution", type=int)
    lo.add_argument("--guidance-scale", dest="guidance_scale", type=float)
    lo.add_argument("--validation-prompt", dest="validation_prompt")
    lo.add_argument("--validation-every", dest="validation_every", type=int)
    lo.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    lo.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None)
    lo.add_argument("--seed", type=int)
    lo.add_argument("--class-data", dest="class_data",
                    help="prior preservation: folder of class images (captions beside them, or --class-prompt)")
    lo.add_argument("--class-prompt", dest="class_prompt",
                    help="caption of the class images; missing ones are generated by the base model")
    lo.add_argument("--num-class-images", dest="num_class_images", type=int)
    lo.add_argument("--prior-loss-weight", dest="prior_loss_weight", type=float)
    lo.add_argument("--timestep-sampling", dest="timestep_sampling", choices=["logit_normal", "uniform", "mode"],
                    help="density of training noise levels (default logit_normal)")
    lo.add_argument("--logit-mean", dest="logit_mean", type=float,
                    help="logit_normal's mean: above 0 trains more at high noise, where layout is decided")
    lo.add_argument("--logit-std", dest="logit_std", type=float)
    lo.add_argument("--class-batch-size", dest="class_batch_size", type=int,
                    help="class images per batch beside the instance images (default: --batch-size)")
    lo.add_argument("--prior-target", dest="prior_target", choices=["images", "base_model"],
                    help="what the class half learns: the class images' velocity (DreamBooth), or the frozen base "
                         "model's own prediction at the same noisy input (costs one extra forward of that half)")
    lo.add_argument("--caption-dropout", dest="caption_dropout", type=float,
                    help="share of samples trained on the empty prompt (keeps true CFG's negative branch)")
    lo.add_argument("--random-flip", dest="random_flip", action="store_true", default=None,
                    help="mirror training images left-right at random")
    lo.add_argument("--mixed-precision", dest="mixed_precision", choices=["no", "bf16", "auto"],
                    help="bf16: the transformer's matmuls in bfloat16, the adapter float32 (about 2x faster on "
                         "CPUs with bf16 units, ~40x slower without); auto: bf16 only where it is fast")
    lo.add_argument("--lora-layers", dest="targets", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()),
                    help="comma-separated layer names to adapt (diffusers names such as attn.to_q,proj_mlp, or "
                         "original ones); default: the DreamBooth-LoRA recipe's attention and feed-forward layers")
    lo.add_argument("--fresh", action="store_true")
    lo.add_argument("--max-minutes", type=float, default=None)
    lo.set_defaults(func=cmd_train_lora)

    e = sub.add_parser("eval", help="score a model on the shapes eval set")
    e.add_argument("--model", default=None)
    e.add_argument("--out", default="out/eval")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    e.add_argument("--seeds", type=int, default=1,
                   help="noise seeds per prompt (the first is the standard set): N times the images and the time, "
                        "about 1/sqrt(N) the seed noise, to tell two models apart")
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--guidance", type=float, default=None)
    _add_cache_arguments(e)
    e.add_argument("--quantize", choices=QUANTIZE_AT_LOAD, default=None, help="quantize the transformer at load")
    e.add_argument("--true-cfg", dest="true_cfg", type=float, default=None, help="true CFG scale (default: the model's)")
    e.add_argument("--true-cfg-schedule", dest="true_cfg_schedule", default=None, metavar="SPEC",
                   help="true CFG scale over the steps, as `fluxion generate --true-cfg-schedule` (linear:3:1.5, ...)")
    e.add_argument("--steps-sweep", dest="steps_sweep", default=None, metavar="1,2,4,8,28",
                   help="accuracy per kind and seconds per image at each of these step counts, one table")
    e.add_argument("--probe", choices=("relations", "counts", "shapes"), default=None,
                   help="swap only the relation (or count) word at fixed seeds: does the layout follow the word? "
                        "shapes: trade the two objects' shape words: are shapes bound to their colours?")
    e.add_argument("--probe-bases", dest="probe_bases", type=int, default=8, help="colour-shape choices per probe")
    e.add_argument("--probe-seeds", dest="probe_seeds", type=int, default=5, help="seeds per colour-shape choice")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="time fluxion: per step, per image at batch 1/4/16, step caching, peak RSS")
    b.add_argument("--model", default=None)
    b.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--cache-threshold", dest="cache_threshold", type=float, default=0.2)
    b.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    b.add_argument("--vs-diffusers", dest="vs_diffusers", action="store_true",
                   help="run bench/speed.py: fluxion and diffusers on the same weights, ratios (needs diffusers)")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-style images API, jobs, SSE, web page)")
    s.add_argument("--model", default=None, help="model folder (default: the shipped fluxion-mini)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs --api-key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--lora-dir", dest="lora_dir", default=None, help="folder of named adapters (<name>.safetensors)")
    s.add_argument("--api-key", dest="api_key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key")
    s.add_argument("--max-queue", dest="max_queue", type=int, default=64)
    s.add_argument("--max-batch", dest="max_batch", type=int, default=4)
    s.add_argument("--batch-window-ms", dest="batch_window_ms", type=float, default=50.0)
    s.add_argument("--max-pixels", dest="max_pixels", type=int, default=1024 * 1024)
    s.add_argument("--max-steps", dest="max_steps", type=int, default=50)
    s.add_argument("--max-n", dest="max_n", type=int, default=4)
    s.add_argument("--job-ttl", dest="job_ttl", type=float, default=600.0, help="seconds a finished job is kept")
    s.add_argument("--request-timeout", dest="request_timeout", type=float, default=600.0)
    s.add_argument("--lora-cache", dest="lora_cache", type=int, default=8, help="adapters kept loaded (LRU)")
    s.add_argument("--preview-every", dest="preview_every", type=int, default=4,
                   help="a preview image every N steps in the job events (0: none)")
    s.add_argument("--quantize", default=None, help="quantize the transformer while loading (int8, q8_0, ...)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    s.add_argument("--workers", type=_serve_count, default=1, metavar="N",
                   help="model replicas, one process each, taking batches from the one queue (default 1: one "
                        "worker thread in the server process); for several GPUs or many cores")
    s.add_argument("--replica-threads", dest="replica_threads", type=_serve_count,
                   default=None, metavar="T", help="torch threads per replica (default: cores // N)")
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; OSError: unreadable or unwritable files
        if args.debug:
            raise
        print(f"fluxion {args.command}: error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
