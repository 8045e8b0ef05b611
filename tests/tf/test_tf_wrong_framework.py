"""The Keras pieces, given to another framework, say which gradwatch class belongs there."""

from __future__ import annotations

import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")

import gradwatch
from gradwatch_tf import GradWatchCallback


def test_keras_callback_in_a_lightning_trainer_names_the_lightning_callback():
    pl = pytest.importorskip("lightning.pytorch")
    with pytest.raises(TypeError, match=r"gradwatch_torch\.lightning\.GradWatchCallback"):
        trainer = pl.Trainer(callbacks=[GradWatchCallback(sinks=["memory"])], logger=False, enable_checkpointing=False)
        trainer.fit(pl.demos.boring_classes.BoringModel())


def test_keras_callback_in_a_hugging_face_trainer_names_the_transformers_callback():
    transformers = pytest.importorskip("transformers")
    handler = transformers.trainer_callback.CallbackHandler([GradWatchCallback(sinks=["memory"])], None, None, None, None)
    args = transformers.TrainingArguments(output_dir="unused", report_to=[])
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    with pytest.raises(TypeError, match=r"gradwatch_torch\.transformers\.GradWatchCallback"):
        handler.on_init_end(args, state, control)


def test_watch_with_a_torch_optimizer_says_to_pass_a_keras_one():
    torch = pytest.importorskip("torch")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match=r"needs a Keras optimizer.*received torch\.optim\.sgd\.SGD"):
        gradwatch.watch(model, torch_opt, sinks=["memory"])
    assert "apply" not in vars(torch_opt)
