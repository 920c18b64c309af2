"""Meta-World demonstrations and rollouts (the robot extra, which ``make install`` and CI install): the scripted
experts' episodes generated, cached and read back identically; evaluation starts disjoint from the
demonstrations'; a multi-task context; a policy trained a few steps and rolled out with its success logged, its
normalisation read back from the checkpoint; without the extra, one sentence."""

import sys

import pytest
import torch

from flowdiff.errors import ConfigError
from helpers import POLICY_FAST, compose_cfg

pytest.importorskip("metaworld", reason="Meta-World is the robot extra: pip install -e '.[robot]'")

from flowdiff.policies import metaworld as mw  # noqa: E402
from flowdiff.policies.data import MetaWorldDataModule  # noqa: E402


def test_demonstrations_are_generated_cached_and_read_back_identically(tmp_path, capsys):
    first = mw.demonstrations(["reach-v3"], 2, seed=3, max_steps=150, cache_dir=tmp_path / "a")
    assert "generated" in capsys.readouterr().out and len(list((tmp_path / "a").glob("*.pt"))) == 1
    again = mw.demonstrations(["reach-v3"], 2, seed=3, max_steps=150, cache_dir=tmp_path / "a")
    assert "read from" in capsys.readouterr().out
    fresh = mw.demonstrations(["reach-v3"], 2, seed=3, max_steps=150, cache_dir=tmp_path / "b")  # simulated again
    for a, b, c in zip(first, again, fresh):
        assert a["obs"].shape[1] == mw.STATE_DIM and a["actions"].shape[1] == mw.ACTION_DIM
        assert len(a["obs"]) == len(a["actions"]) + 1 and a["success"]  # reach's expert succeeds, and stops there
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in ("obs", "actions"))
        assert a["actions"].abs().max() <= 1
    other = mw.demonstrations(["reach-v3"], 2, seed=4, max_steps=150, cache_dir=tmp_path / "a")  # another key
    assert len(list((tmp_path / "a").glob("*.pt"))) == 2 and not torch.equal(other[0]["obs"][0], first[0]["obs"][0])


def test_evaluation_starts_are_disjoint_from_the_demonstrations(tmp_path):
    dm = MetaWorldDataModule(task="reach-v3", demos=3, seed=0, max_steps=120, cache_dir=str(tmp_path), n_val=32)
    starts = torch.stack([ep["obs"][0] for ep in dm.episodes])  # (3, 39)
    env = dm.make_env(3, dm.evaluation_seed())
    evaluation = env.reset()
    assert evaluation.shape == (3, 39) and torch.cdist(evaluation[:, -3:], starts[:, -3:]).min() > 1e-3  # goals
    for _ in range(5):  # a used simulator, reset to another start and back, is where a new one would be
        env.step(2 * torch.rand(3, 4) - 1)
    other = mw.MetaWorldEpisodes(["reach-v3"], 3, seed=1)
    other.reset()
    assert torch.equal(env.reset(), evaluation)  # a start is a function of its seed and index alone
    fresh = mw._benchmark("reach-v3", 0).train_classes["reach-v3"]()  # outside the pool
    fresh.set_task(mw.start("reach-v3", dm.evaluation_seed(), 2))
    assert torch.equal(torch.as_tensor(fresh.reset()[0], dtype=torch.float32), evaluation[2])
    assert dm.data_shape == (8, 4)  # the class's horizon (the config's is 16)
    other.reset()  # takes the pooled simulators over
    with pytest.raises(RuntimeError, match="reset by a later episode set"):
        env.step(torch.zeros(3, 4))
    # the chunks past an episode's end repeat its last action (a closed gripper stays closed)
    last = dm.episodes[0]["actions"][-1]
    assert torch.allclose(dm.normaliser.actions_out(dm.chunks[len(dm.episodes[0]["actions"]) - 1][None])[0, -1], last)


def test_several_tasks_put_the_task_in_the_context(tmp_path):
    env = mw.MetaWorldEpisodes(["reach-v3", "push-v3"], 4, seed=0, max_steps=5)
    obs = env.reset()
    assert obs.shape == (4, 41) and torch.equal(obs[:, 39:], torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]]).float())
    for _ in range(5):
        obs = env.step(env.expert_actions())
    assert bool(env.done.all()) and len(env.path) == 6 and env.path[0].shape == (4, 3)
    whole = mw.MetaWorldEpisodes(["reach-v3", "push-v3"], 5, seed=0, max_steps=5).reset()
    share = mw.MetaWorldEpisodes(["reach-v3", "push-v3"], 2, seed=0, max_steps=5, first=3)  # a DDP rank's share
    assert torch.equal(share.reset(), whole[3:]) and share.task_of == [1, 0]  # the same tasks and starts
    with pytest.raises(ConfigError, match="not a Meta-World v3 task"):
        mw.check_tasks(["reach-v2"])


def test_a_metaworld_policy_trains_rolls_out_and_keeps_its_normalisation(tmp_path):
    from flowdiff.build import load_checkpoint
    from flowdiff.runs import train

    cfg = compose_cfg(
        [
            "experiment=metaworld_reach",
            *POLICY_FAST,
            "data.demos=2",
            "data.max_steps=40",
            f"data.cache_dir={tmp_path / 'demos'}",
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    assert 0 <= metrics["val/success_rate"] <= 1 and metrics["nfe"] == 2 and metrics["val/ms_per_chunk"] > 0
    assert (tmp_path / "run" / "plots" / "rollouts_step0000004.png").exists()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    stored = ckpt["MetaWorldDataModule"]["normaliser"]
    assert stored["obs_mean"].shape == (39,) and stored["act_std"].shape == (4,)
    _, dm, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert torch.equal(dm.normaliser.obs_mean, stored["obs_mean"])
    # what a checkpoint stores is what rollouts apply, even where the rebuilt demonstrations would differ
    shifted = stored["act_mean"] + 1
    ckpt["MetaWorldDataModule"]["normaliser"]["act_mean"] = shifted
    torch.save(ckpt, tmp_path / "edited.ckpt")
    _, dm, _ = load_checkpoint(tmp_path / "edited.ckpt")
    assert torch.equal(dm.normaliser.act_mean, shifted)


def test_without_the_extra_data_metaworld_is_one_sentence(monkeypatch, tmp_path):
    from flowdiff.build import build_datamodule

    monkeypatch.setitem(sys.modules, "metaworld", None)  # import metaworld now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[robot\]'") as err:
        build_datamodule(compose_cfg(["data=metaworld"], tmp_path))  # through Hydra's instantiate
    assert "\n" not in str(err.value) and "InstantiationException" not in str(err.value)
