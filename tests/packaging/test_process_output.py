"""Keras prints on process 0 only under a distribution, unless asked."""

import pytest


@pytest.fixture
def process_output(monkeypatch):
    from keras.src.backend.common import global_state
    from keras.src.distribution import process_output

    monkeypatch.delenv(process_output.ALL_PROCESSES_ENV, raising=False)
    yield process_output
    global_state.set_global_attribute("distribution", None)


def _distribute_as(process_output, monkeypatch, process_id):
    from keras.src.backend.common import global_state

    global_state.set_global_attribute("distribution", object())
    monkeypatch.setattr(process_output, "process_id", lambda: process_id)


def test_without_a_distribution_every_process_prints(process_output):
    assert process_output.prints()


def test_under_a_distribution_only_process_0_prints(
    process_output, monkeypatch
):
    _distribute_as(process_output, monkeypatch, 1)
    assert not process_output.prints()
    _distribute_as(process_output, monkeypatch, 0)
    assert process_output.prints()


def test_every_process_prints_when_asked(process_output, monkeypatch):
    _distribute_as(process_output, monkeypatch, 1)
    monkeypatch.setenv(process_output.ALL_PROCESSES_ENV, "1")
    assert process_output.prints()


def test_print_msg_and_summary_follow_it(process_output, monkeypatch, capsys):
    import keras
    from keras.src.utils import io_utils

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    _distribute_as(process_output, monkeypatch, 1)
    io_utils.print_msg("hidden")
    model.summary()
    assert capsys.readouterr().out == ""
    lines = []
    model.summary(print_fn=lines.append)  # The caller's choice: called.
    assert lines
    _distribute_as(process_output, monkeypatch, 0)
    io_utils.print_msg("shown")
    assert "shown" in capsys.readouterr().out
