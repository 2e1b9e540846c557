"""The web page (Gradio): upload an image (or type a sentence, for a text-conditioned run), read the
caption and, for a diffusion run, step through or play the denoising trajectory: the tokens of the x0
estimate at every sampling step. The page captions through the same queue as the API, so its requests
are batched with the API's and obey the same limits."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import gradio as gr

from ..config import MAX_MBR
from .batching import QueueFull
from .limits import InputError, check_text, decode_image
from .service import MAX_GUIDANCE, CaptionService

log = logging.getLogger(__name__)

PLAY_DELAY_S = 0.25  # between trajectory steps while playing


def build_page(service: CaptionService) -> gr.Blocks:
    accepts, defaults, cfg = service.inputs.accepts, service.defaults, service.pipe.cfg
    run_name = service.run_dir.resolve().name if service.run_dir.name in ("", ".") else service.run_dir.name
    # delete_cache: Gradio keeps every upload in its cache folder; drop those older than an hour, hourly.
    with gr.Blocks(title=f"diffcap: {run_name}", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        how = " that forms the caption by denoising; the trajectory shows each step" if service.iterative else ""
        gr.Markdown(f"## diffcap: caption with `{service.run_dir}`\nA {cfg.model.kind} captioner{how}.")
        with gr.Row():
            with gr.Column():
                upload = text = gallery = None
                if "image" in accepts:
                    formats = ", ".join(service.limits.formats)
                    upload = gr.File(label=f"Image ({formats})", type="filepath", elem_id="upload")
                if "text" in accepts:
                    text = gr.Textbox(
                        label="Sentence (this run is conditioned on text features)", elem_id="text", lines=2
                    )
                with gr.Accordion("Settings (the run's defaults)", open=True, visible=service.iterative):
                    steps = guidance = samples = seed = None
                    if service.iterative:
                        most = min(cfg.diffusion.num_timesteps, 200)
                        steps = gr.Slider(
                            1, most, value=min(defaults["steps"], most), step=1, label="Steps", elem_id="steps"
                        )
                        guidance = gr.Slider(
                            0,
                            min(MAX_GUIDANCE, 10.0),
                            value=defaults["guidance_scale"],
                            step=0.1,
                            label="Guidance scale (classifier-free)",
                            elem_id="guidance",
                        )
                        samples = gr.Slider(
                            1,
                            min(MAX_MBR, 16),
                            value=defaults["samples"],
                            step=1,
                            label="Samples (minimum Bayes risk picks one)",
                            elem_id="samples",
                        )
                        seed = gr.Number(value=defaults["seed"], precision=0, label="Seed", elem_id="seed")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                if service.examples and "image" in accepts and upload is not None and cfg.model.image_encoder:
                    gallery = gr.Gallery(
                        value=service.examples,
                        label="Examples from the run's data: click one",
                        columns=4,
                        height=240,
                        allow_preview=False,
                        format="png",
                        elem_id="examples",
                    )
                elif service.examples and text is not None:
                    gr.Examples(examples=[[s] for s in service.examples], inputs=[text], label="Examples")
            with gr.Column():
                preview = gr.Image(
                    label="Captioned image",
                    interactive=False,
                    height=200,
                    elem_id="preview",
                    visible="image" in accepts,
                )
                caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
                status = gr.Markdown(elem_id="status")
                trajectory = gr.State([])
                with gr.Group(visible=service.iterative):
                    step = gr.Slider(1, 2, value=1, step=1, label="Trajectory step", elem_id="step")
                    estimate = gr.Textbox(label="x0 estimate at this step", interactive=False, elem_id="estimate")
                    play = gr.Button("Play the trajectory", elem_id="play")

        named_inputs = [
            (n, c)
            for n, c in (("steps", steps), ("guidance_scale", guidance), ("samples", samples), ("seed", seed))
            if c is not None
        ]
        setting_inputs = [c for _, c in named_inputs]

        def settings_of(values) -> dict:
            named = dict(zip([n for n, _ in named_inputs], values))
            return {k: v for k, v in named.items() if v is not None}

        def run(kind: str, item, values):
            """-> preview, caption, status, trajectory, step slider, estimate"""
            started = time.perf_counter()
            try:
                if kind == "image":
                    if item is None:
                        raise InputError("choose an image file first")
                    image = decode_image(Path(item).read_bytes(), service.limits) if isinstance(item, str) else item
                    payload = image
                else:
                    image, payload = None, check_text(item or "", service.limits)
                chosen = service.settings(dict(settings_of(values), trajectory=service.iterative))
                future = service.submit(kind, payload, chosen)
                try:
                    result = future.result(timeout=service.limits.timeout_s)
                except TimeoutError:
                    future.cancel()  # still queued: the worker skips it
                    raise InputError(
                        f"captioning did not finish within {service.limits.timeout_s:g} s; "
                        "the server is busy, try again shortly"
                    ) from None
            except (InputError, QueueFull, OSError) as exc:
                return _failed(str(exc))
            except Exception as exc:  # a failed batch: said on the page, logged with its traceback
                log.exception("captioning failed")
                return _failed(f"internal error: {type(exc).__name__}: {exc}")
            seconds = time.perf_counter() - started
            steps_done = f", {result['steps']} steps" if result["steps"] else ""
            traj = result.get("trajectory", [])
            batch = f", captioned in a batch of {result['batch_size']}" if result["batch_size"] > 1 else ""
            return (
                image,
                result["caption"],
                f"{seconds:.3f} s{steps_done}{batch}",
                traj,
                gr.Slider(1, max(len(traj), 2), value=max(len(traj), 1), step=1),
                _describe_step(traj, len(traj)),
            )

        # concurrency_limit=None: page requests run side by side, so the queue can batch them; it bounds them.
        outputs = [preview, caption, status, trajectory, step, estimate]
        inputs = [c for c in (upload, text) if c is not None]

        def from_inputs(*values):
            """The button: the uploaded image if there is one, else the sentence."""
            file = values[0] if upload is not None else None
            sentence = values[len(inputs) - 1] if text is not None else None
            settings = values[len(inputs) :]
            if file is not None or text is None:
                return run("image", file, settings)
            return run("text", sentence, settings)

        button.click(from_inputs, [*inputs, *setting_inputs], outputs, concurrency_limit=None)
        if upload is not None:
            upload.upload(lambda f, *v: run("image", f, v), [upload, *setting_inputs], outputs, concurrency_limit=None)
        if gallery is not None:

            def from_gallery(evt: gr.SelectData, *values):
                return run("image", service.examples[evt.index], values)

            gallery.select(from_gallery, setting_inputs, outputs, concurrency_limit=None)
        if text is not None:
            text.submit(lambda t, *v: run("text", t, v), [text, *setting_inputs], outputs, concurrency_limit=None)
        step.input(lambda traj, i: _describe_step(traj, int(i)), [trajectory, step], [estimate], concurrency_limit=None)

        def play_steps(traj):
            for i in range(1, len(traj) + 1):
                yield gr.Slider(value=i), _describe_step(traj, i)
                time.sleep(PLAY_DELAY_S)

        play.click(play_steps, [trajectory], [step, estimate], concurrency_limit=None)
    return page


def _failed(message: str) -> tuple:
    return None, "", f"**Error:** {message}", [], gr.Slider(1, 2, value=1), ""


def _describe_step(traj: list, i: int) -> str:
    """Step i (1-based) of a trajectory of (timestep, x0 tokens) pairs."""
    if not traj:
        return ""
    i = min(max(i, 1), len(traj))
    t, tokens = traj[i - 1]
    return f"step {i}/{len(traj)}, t={t}: {tokens}"
