"""DreamBooth with SingLoRA on tiny diffusers U-Nets: injection (self- and rectangular cross-attention), learning,
save/load, the diffusers LoRA export loaded by stock ``load_lora_weights``, and the SD / SDXL folder loading path."""

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from torch_singlora import SingLoRAModel  # noqa: E402
from torch_singlora.diffusion.dreambooth import (  # noqa: E402
    DEFAULT_TARGETS, DreamBoothArgs, add_singlora, denoising_loss, dreambooth_loss, train_dreambooth,
)
from torch_singlora.diffusion.pipeline import encode_prompt, load_pipeline, pipeline_class_name  # noqa: E402
from torch_singlora.diffusion.tiny import tiny_stable_diffusion, tiny_stable_diffusion_xl, tiny_unet  # noqa: E402
from torch_singlora.errors import SingLoRAError  # noqa: E402
from torch_singlora.layers import SingLoRALayer  # noqa: E402


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = unet.dtype
    c, s = unet.config.in_channels, unet.config.sample_size
    sample = torch.randn(batch, c, s, s, generator=g).to(dtype)
    text = torch.randn(batch, 8, unet.config.cross_attention_dim, generator=g).to(dtype)
    return sample, torch.tensor([10, 500][:batch]), text


def randomize(model: SingLoRAModel, seed=1, step=None):
    """Give every A a visible value and finish the ramp (u = 1) so outputs differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.singlora_layers():
            for adapter in layer.singlora.values():
                adapter.A.copy_(torch.randn(adapter.A.shape, generator=g, dtype=adapter.A.dtype) * 0.3)
    model.set_ramp_step(step if step is not None else 10**6)


def test_injection_targets_self_and_rectangular_cross_attention_against_dense_float64():
    base = tiny_unet().double()  # channels (16, 32), text dim 16
    names = [n for n, _ in base.named_modules() if n.endswith((".to_q", ".to_k"))]
    reference = copy.deepcopy(base)
    model = add_singlora(base, r=4, ramp_up_steps=0)
    layers = dict(model.singlora_layers())
    assert sorted(layers) == sorted(names) and len(names) == 7 * 4  # 7 transformer blocks x attn1/attn2 x q/k
    cross_k = [n for n in names if n.endswith("attn2.to_k")]
    for name in names:
        layer = layers[name]
        d_out, d_in = layer.base_layer.weight.shape
        assert (layer.d_out, layer.d_in) == (d_out, d_in)
        assert layer.singlora["default"].A.shape == (max(d_out, d_in), 4)
        if name in cross_k:
            assert d_in == 16 and d_out in (16, 32)
    assert any(layers[n].d_out == 32 and layers[n].d_in == 16 for n in cross_k)  # a truly rectangular one
    # only A trains; 4 * max(d_out, d_in) parameters per adapted matrix
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("singlora.default.A") for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == sum(4 * max(layers[n].d_out, layers[n].d_in) for n in names)

    randomize(model)
    with torch.no_grad():  # dense float64 reference: W0 + s * A[:out] @ A[:in].T written into a plain copy
        for name in names:
            A = layers[name].singlora["default"].A
            weight = reference.get_submodule(name).weight
            weight += 1.0 * A[: weight.shape[0]] @ A[: weight.shape[1]].T
        inputs = unet_inputs(base)
        expected = reference(*inputs).sample
        got = model(*inputs).sample
        with model.disable_adapters():
            plain = model(*inputs).sample
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_untrained_adapter_is_the_base_model():
    base = tiny_unet()
    inputs = unet_inputs(base)
    with torch.no_grad():
        before = base(*inputs).sample
        model = add_singlora(base)
        assert model.get_ramp_step() == 0
        torch.testing.assert_close(model(*inputs).sample, before, rtol=0, atol=0)  # u(0) = 0


def test_few_training_steps_reduce_the_loss():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet = tiny_unet()
    model = add_singlora(unet, r=4, ramp_up_steps=2, total_steps=None)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(4, 1, 16, 16)
    text = torch.randn(4, 8, 16)

    def fixed_loss():
        with torch.no_grad():
            return float(denoising_loss(model, scheduler, latents, text, generator=torch.Generator().manual_seed(7)).mean())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.bind_optimizer(optimizer)
    start = fixed_loss()
    for step in range(25):
        loss = denoising_loss(model, scheduler, latents, text, generator=torch.Generator().manual_seed(7)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.get_ramp_step() == 25
    assert fixed_loss() < 0.8 * start


def test_dreambooth_loss_weights_the_prior_half():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert float(dreambooth_loss(per_sample, 2, 0.5)) == pytest.approx(2.0 + 0.5 * 15.0)
    assert float(dreambooth_loss(per_sample[:2], 2, 0.5)) == pytest.approx(2.0)


def test_save_load_round_trip_gives_identical_unet_outputs(tmp_path):
    base = tiny_unet()
    fresh = copy.deepcopy(base)
    model = add_singlora(base, r=8)
    randomize(model, step=2)  # mid-ramp: the saved step matters
    model.save_adapter(tmp_path / "adapter")
    loaded = SingLoRAModel.from_pretrained(fresh, tmp_path / "adapter")
    assert loaded.get_ramp_step() == 2
    inputs = unet_inputs(base)
    with torch.no_grad():
        assert torch.equal(model(*inputs).sample, loaded(*inputs).sample)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_loads_in_stock_diffusers_with_identical_unet_outputs(tmp_path, fmt):
    """The exported file goes through diffusers' own loader (``pipe.load_lora_weights``); no singlora code runs
    on the loading side."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from torch_singlora.export import export_lora

    tiny_stable_diffusion(tmp_path / "model")
    adapted = load_pipeline(tmp_path / "model").unet
    model = add_singlora(adapted, r=8)
    randomize(model, step=2)
    export_lora(model, tmp_path / "lora", format=fmt)

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    inputs = unet_inputs(pipe.unet)
    with torch.no_grad():
        base_out = pipe.unet(*inputs).sample
        pipe.load_lora_weights(str(tmp_path / "lora"))
        assert not any(isinstance(m, SingLoRALayer) for m in pipe.unet.modules())
        stock = pipe.unet(*inputs).sample
        ours = model(*inputs).sample
    assert (ours - base_out).abs().max() > 1e-3
    torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-5)


def test_loads_sd_and_sdxl_folders_written_by_save_pretrained(tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tiny_stable_diffusion(tmp_path / "sd")
    tiny_stable_diffusion_xl(tmp_path / "sdxl")
    sd, sdxl = load_pipeline(tmp_path / "sd"), load_pipeline(tmp_path / "sdxl")
    assert type(sd) is StableDiffusionPipeline and type(sdxl) is StableDiffusionXLPipeline
    embeds, added = encode_prompt(sd, "a photo of sks dog", 16, torch.device("cpu"))
    assert embeds.shape == (1, 8, 16) and added is None
    embeds, added = encode_prompt(sdxl, "a photo of sks dog", 32, torch.device("cpu"))
    assert embeds.shape == (1, 8, 32) and added["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
    model = add_singlora(sdxl.unet)
    loss = denoising_loss(model, sdxl.scheduler, torch.randn(1, 4, 16, 16), embeds, added_cond_kwargs=added)
    loss.sum().backward()
    assert all(layer.singlora["default"].A.grad is not None for _, layer in model.singlora_layers())
    with pytest.raises(SingLoRAError, match="model_index.json"):
        pipeline_class_name(tmp_path)


def write_images(directory, n, seed=0):
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(directory / f"{i}.png")


def test_train_dreambooth_end_to_end_with_prior_checkpoints_resume_and_export(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    tiny_stable_diffusion(tmp_path / "model")
    write_images(tmp_path / "instance", 3)
    args = DreamBoothArgs(
        pretrained_model=str(tmp_path / "model"), instance_data_dir=str(tmp_path / "instance"),
        instance_prompt="a photo of sks dog", output_dir=str(tmp_path / "out"), resolution=16, max_train_steps=4,
        train_batch_size=1, gradient_accumulation_steps=2, checkpointing_steps=2, checkpoints_total_limit=1,
        with_prior_preservation=True, class_data_dir=str(tmp_path / "class"), class_prompt="a photo of dog",
        num_class_images=2, validation_prompt="a photo of sks dog", validation_steps=2, num_validation_images=1,
        validation_inference_steps=2, ramp_up_steps=2, gradient_checkpointing=True,
    )
    model = train_dreambooth(args)
    out = tmp_path / "out"
    assert model.get_ramp_step() == 4  # optimizer steps, not the 8 micro-batches
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # total limit 1
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_000002_0.png", "step_000004_0.png"]

    args.max_train_steps, args.resume_from_checkpoint = 6, "latest"
    resumed = train_dreambooth(args)
    assert resumed.get_ramp_step() == 6

    pipe = StableDiffusionPipeline.from_pretrained(out.parent / "model", safety_checker=None)
    pipe.load_lora_weights(str(out / "diffusers_lora"))
    inputs = unet_inputs(pipe.unet)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*inputs).sample, resumed(*inputs).sample, rtol=1e-5, atol=1e-5)
    reloaded = SingLoRAModel.from_pretrained(load_pipeline(out.parent / "model").unet, out / "singlora")
    with torch.no_grad():
        assert torch.equal(reloaded(*inputs).sample, resumed(*inputs).sample)


def test_dreambooth_args_errors_name_the_option(tmp_path):
    write_images(tmp_path / "instance", 1)
    good = dict(pretrained_model=str(tmp_path), instance_data_dir=str(tmp_path / "instance"), instance_prompt="p")
    with pytest.raises(SingLoRAError, match="--instance-data-dir"):
        DreamBoothArgs(**{**good, "instance_data_dir": str(tmp_path / "missing")}).validate()
    with pytest.raises(SingLoRAError, match="--with-prior-preservation"):
        DreamBoothArgs(**good, with_prior_preservation=True).validate()
    with pytest.raises(SingLoRAError, match="--mixed-precision"):
        DreamBoothArgs(**good, mixed_precision="fp8").validate()
    with pytest.raises(SingLoRAError, match="model_index.json"):
        train_dreambooth(DreamBoothArgs(**good, output_dir=str(tmp_path / "out")))
    assert DEFAULT_TARGETS == ["to_q", "to_k"]


def test_mixed_precision_bf16_keeps_the_adapter_in_float32(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    tiny_stable_diffusion(tmp_path / "model")
    write_images(tmp_path / "instance", 1)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        model = train_dreambooth(DreamBoothArgs(
            pretrained_model=str(tmp_path / "model"), instance_data_dir=str(tmp_path / "instance"),
            instance_prompt="a photo of sks dog", output_dir=str(tmp_path / "out"), resolution=16, max_train_steps=2,
            mixed_precision="bf16", ramp_up_steps=1, export_lora=False,
        ))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert model.get_ramp_step() == 2
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert all(layer.base_layer.weight.dtype == torch.bfloat16 for _, layer in model.singlora_layers())
    A = dict(model.singlora_layers())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].singlora["default"].A
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "singlora" / "adapter_model.safetensors")
    assert torch.equal(saved["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.singlora_A"], A.detach())
