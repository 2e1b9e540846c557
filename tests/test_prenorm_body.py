"""The pre-norm denoiser body (``model.body: prenorm``) and a student that starts from its autoregressive
teacher (``model.init_from``)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import small_config

from diffcap.config import ConfigError, validate
from diffcap.models.diffusion_captioner import DiffusionCaptioner
from diffcap.models.prenorm_body import PrenormEncoder
from diffcap.training import Trainer
from diffcap.training.rundir import RunDir


def prenorm_config(data_dir, steps: int = 30):
    cfg = small_config(data_dir, steps=steps)
    cfg.model.body = "prenorm"
    cfg.model.score_interpolation = True  # a head over the vocabulary, which the teacher's tied one starts
    cfg.model.dropout = 0.1  # the copy must carry over whatever the teacher learned, dropout or not
    return cfg


def test_prenorm_body_is_bidirectional_and_rebuilds_from_its_saved_config(feature_data):
    cfg = prenorm_config(feature_data)
    cfg.model.cond_dim, cfg.model.cond_tokens = 16, 1
    torch.manual_seed(0)
    model = DiffusionCaptioner(cfg.model, cfg.diffusion, vocab_size=50, seq_len=10).eval()
    assert isinstance(model.denoiser.body, PrenormEncoder)
    # a saved run rebuilds the same architecture from body_config.json alone
    again = DiffusionCaptioner(
        cfg.model, cfg.diffusion, vocab_size=50, seq_len=10, pretrained=False, backbone_config=model.body_config()
    ).eval()
    again.load_state_dict(model.state_dict())
    x_t, t, cond = torch.randn(2, 10, 16), torch.tensor([5, 150]), torch.randn(2, 1, 16)
    with torch.no_grad():
        out = model.denoiser(x_t, t, cond)
        assert torch.equal(out, again.denoiser(x_t, t, cond))
        # bidirectional: the first position reads the last one (a causal body would not)
        later = x_t.clone()
        later[:, -1] += 1.0
        assert not torch.allclose(model.denoiser(later, t, cond)[:, 0], out[:, 0])


@pytest.fixture
def teacher(feature_data, tmp_path):
    cfg = small_config(feature_data, steps=30)
    cfg.model.kind = "autoregressive"
    Trainer(cfg, tmp_path / "teacher").train(resume=False)
    return tmp_path / "teacher"


def mapped_pairs(student: DiffusionCaptioner, teacher) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, student tensor, teacher tensor) for everything model.init_from copies."""
    body, seq_len = student.denoiser.body, student.seq_len
    modules = {"blocks": (body.blocks, teacher.blocks), "ln_f": (body.ln_f, teacher.ln_f)}
    modules["cond_proj"] = (student.denoiser.cond_proj, teacher.cond_proj)
    pairs = [
        (f"{name}.{key}", value, theirs.state_dict()[key])
        for name, (mine, theirs) in modules.items()
        for key, value in mine.state_dict().items()
    ]
    pairs += [("caption positions", body.position[:seq_len], teacher.token_pos[:seq_len])]
    pairs += [("condition positions", body.position[seq_len:], teacher.prefix_pos)]
    head, table = student.denoiser.out_proj, teacher.token_embedding.weight
    words = [i for i in range(table.shape[0]) if i != student.pad_id]
    pairs += [("head", head.weight[words], table[words]), ("head bias", head.bias, torch.zeros_like(head.bias))]
    pairs += [("PAD row = EOS row", head.weight[student.pad_id], table[teacher.eos_id])]
    return pairs


def test_student_starts_from_its_teacher_and_a_resume_does_not_need_it(feature_data, teacher, tmp_path):
    _, ar, _ = RunDir(teacher).load_model(ema=True)

    cfg = prenorm_config(feature_data, steps=1)
    cfg.train.lr = cfg.train.final_lr = 1e-9  # one step that moves nothing measurably: the weights as copied
    cfg.train.save_every = 1
    cfg.model.init_from = str(teacher)
    Trainer(cfg, tmp_path / "student").train(resume=False)
    _, student, _ = RunDir(tmp_path / "student").load_model(ema=False)
    for name, mine, theirs in mapped_pairs(student, ar):
        assert torch.allclose(mine, theirs, atol=1e-6), name

    # without model.init_from the same run starts elsewhere (so the check above can fail)
    cfg.model.init_from = None
    Trainer(cfg, tmp_path / "fresh").train(resume=False)
    _, fresh, _ = RunDir(tmp_path / "fresh").load_model(ema=False)
    assert not torch.allclose(fresh.denoiser.body.blocks[0].attn.qkv.weight, ar.blocks[0].attn.qkv.weight, atol=1e-3)

    # a resumed student has its own weights: it trains on with the teacher gone
    shutil.rmtree(teacher)
    cfg.model.init_from = str(teacher)
    cfg.train.steps = 3
    trainer = Trainer(cfg, tmp_path / "student")
    trainer.train(resume=True)
    assert trainer.resumed_at == 1 and trainer.step == 3


def test_a_teacher_of_another_shape_is_refused_with_its_path(feature_data, teacher, tmp_path):
    cfg = prenorm_config(feature_data)
    cfg.model.n_layers = 3  # the teacher has 2
    cfg.model.init_from = str(teacher)
    with pytest.raises(ValueError, match=rf"{teacher}.*same shape"):
        Trainer(cfg, tmp_path / "student").train(resume=False)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"body": "prenorm", "backbone": "some/bert"}, "no pretrained model.backbone"),
        ({"body": "prenorm", "fusion": "cross"}, "cross-attention"),
        ({"init_from": "runs/teacher"}, "model.body=prenorm"),
        ({"kind": "autoregressive", "body": "prenorm"}, "setting of the diffusion denoiser"),
        ({"body": "gpt"}, "choose one of"),
    ],
)
def test_settings_that_cannot_work_are_refused(feature_data, settings, message):
    cfg = small_config(feature_data)
    for key, value in settings.items():
        setattr(cfg.model, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
