"""Distributed checkpoints: a run killed mid-way resumes to the parameters of one that never
stopped, and a checkpoint resumes at another number of processes."""

from __future__ import annotations

import shutil

import pytest
from conftest import run_job
from safetensors.torch import load_file

from slimkit.errors import SlimkitError
from slimkit.parallel import selfcheck as S
from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.launch import ParallelError

pytestmark = pytest.mark.multiprocess

FSDP2 = ParallelConfig(strategy="fsdp", nproc=2)
# Rank 0 may be stopped by torchrun before it notices its peer is gone: either is reported.
KILLED = r"reported no error, so (it was|one of them was) killed"


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """An FSDP run whose rank 1 was killed (SIGKILL) at step 2 of 3: the checkpoint of step 1 is left."""
    job = tmp_path_factory.mktemp("killed")
    with pytest.raises(ParallelError, match=KILLED):
        run_job(job, "checkpoint_job", FSDP2, kill=2)
    assert (job / "ckpt" / "dcp").is_dir() and not (job / "final.safetensors").exists()
    saved = shutil.copytree(job / "ckpt", job.parent / "killed-ckpt")
    return job, saved


def test_a_killed_run_resumes_to_the_uninterrupted_parameters(killed, tmp_path):
    job, _ = killed
    run_job(job, "checkpoint_job", FSDP2)  # the same job again: it resumes from step 1
    uninterrupted = run_job(tmp_path, "checkpoint_job", FSDP2)
    assert S.worst(load_file(str(job / "final.safetensors")), load_file(str(uninterrupted / "final.safetensors"))) <= 1e-6


def test_one_process_resumes_a_two_process_checkpoint(killed, tmp_path):
    ckpt = shutil.copytree(killed[1], tmp_path / "ckpt")
    resumed = S.run_classifier(checkpoint_dir=ckpt, checkpoint_every=1)
    assert S.worst(resumed, S.run_classifier()) <= 1e-5
    assert not (ckpt / "dcp").exists()  # rewritten in the one-process layout


def test_two_processes_resume_a_one_process_checkpoint(tmp_path):
    def crash(step, _model):
        if step == 2:
            raise KeyboardInterrupt  # stands for a crash after the checkpoint of step 1

    with pytest.raises(KeyboardInterrupt):
        S.run_classifier(checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1, on_step=crash)
    assert (tmp_path / "ckpt" / "state.safetensors").is_file()
    run_job(tmp_path, "checkpoint_job", FSDP2)
    assert S.worst(load_file(str(tmp_path / "final.safetensors")), S.run_classifier()) <= 1e-5


def test_a_checkpoint_of_another_model_is_refused(killed, tmp_path):
    ckpt = shutil.copytree(killed[1], tmp_path / "ckpt")
    with pytest.raises(SlimkitError, match="holds another model"):
        S.run_classifier(checkpoint_dir=ckpt, checkpoint_every=1, width=16)


def test_a_killed_pipeline_resumes_to_the_uninterrupted_parameters(tmp_path):
    pipe = ParallelConfig(strategy="pipeline", nproc=2)
    with pytest.raises(ParallelError, match=KILLED):
        run_job(tmp_path / "killed", "checkpoint_job", pipe, kill=2)
    saved = shutil.copytree(tmp_path / "killed" / "ckpt", tmp_path / "saved")
    run_job(tmp_path / "killed", "checkpoint_job", pipe)
    # The uninterrupted pipeline equals one process to 1e-7 (test_equality); the resumed
    # one must too. (Resumed against uninterrupted to 1e-6: the FSDP test above.)
    assert S.worst(load_file(str(tmp_path / "killed" / "final.safetensors")), S.run_classifier()) <= 1e-5
    # Each stage numbers its optimizer state on its own: only the same cut resumes it.
    with pytest.raises(SlimkitError, match=r"written by a pipeline cut at \['layers.1'\], and this run is a "
                                           "strategy without a pipeline"):
        S.run_classifier(checkpoint_dir=saved, checkpoint_every=1)


def test_zero1_processes_write_their_own_optimizer_partition(tmp_path):
    zero1 = ParallelConfig(strategy="ddp", nproc=2, zero1=True)
    with pytest.raises(ParallelError, match=KILLED):
        run_job(tmp_path / "killed", "checkpoint_job", zero1, kill=2)
    saved = shutil.copytree(tmp_path / "killed" / "ckpt", tmp_path / "saved")
    run_job(tmp_path / "killed", "checkpoint_job", zero1)
    assert S.worst(load_file(str(tmp_path / "killed" / "final.safetensors")), S.run_classifier()) <= 1e-5
    # The two partitions together are the whole optimizer: one process resumes from them.
    assert S.worst(S.run_classifier(checkpoint_dir=saved, checkpoint_every=1), S.run_classifier()) <= 1e-5
