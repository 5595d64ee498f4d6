"""Every non-public use of Ray (`echomamba_dist.distributed.ray_compat`) against the installed Ray.

Each test fails when the installed Ray changes what we rely on, so that a Ray upgrade shows the
list of workarounds to re-check instead of breaking them silently. None starts a Ray cluster.
"""

from __future__ import annotations

import inspect

import ray

from echomamba_dist.distributed import ray_compat


def test_the_installed_ray_is_the_one_the_workarounds_target():
    # on an upgrade: re-check every item of ray_compat, then move TARGET_RAY_VERSION
    assert ray.__version__ == ray_compat.TARGET_RAY_VERSION


def test_ray_init_still_takes_a_root_temp_dir():
    source = inspect.getsource(ray.init)
    assert f'kwargs.pop("{ray_compat.INIT_TEMP_DIR_ARG}"' in source
    assert ray_compat.temp_dir_kwargs("x")[ray_compat.INIT_TEMP_DIR_ARG].endswith("/x")


def test_train_restores_from_the_checkpoint_snapshot_we_name():
    from ray.train.v2._internal import constants

    assert constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == ray_compat.CHECKPOINT_SNAPSHOT_FILE


def test_forget_checkpoints_removes_only_the_snapshot(tmp_path):
    (tmp_path / ray_compat.CHECKPOINT_SNAPSHOT_FILE).write_text("{}")
    (tmp_path / "epoch_000000").mkdir()
    ray_compat.forget_checkpoints(tmp_path)
    ray_compat.forget_checkpoints(tmp_path)  # nothing to remove: no error
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_000000"]


def test_the_state_api_looks_for_its_server_where_we_point_it():
    from ray._private import ray_constants
    from ray.dashboard.utils import get_address_for_submission_client

    assert ray_constants.RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE == ray_compat.API_SERVER_ENV_VAR
    assert ray_compat.API_SERVER_ENV_VAR in inspect.getsource(get_address_for_submission_client)


def test_tune_report_callback_still_hands_reports_over_in_the_queue_we_wait_on():
    from ray.tune.integration.ray_train import TuneReportCallback

    assert f"self.{ray_compat.REPORT_QUEUE_ATTR}" in inspect.getsource(TuneReportCallback)


def test_wait_until_reports_forwarded_waits_for_the_queue_to_empty():
    import queue
    import threading
    import time

    class Callback:
        pass

    callback = Callback()
    setattr(callback, ray_compat.REPORT_QUEUE_ATTR, queue.Queue())
    getattr(callback, ray_compat.REPORT_QUEUE_ATTR).put({"epoch": 0})
    taken = []

    def consumer():
        time.sleep(0.3)
        taken.append(getattr(callback, ray_compat.REPORT_QUEUE_ATTR).get())

    thread = threading.Thread(target=consumer)
    thread.start()
    ray_compat.wait_until_reports_forwarded(callback, timeout=10)
    assert taken == [{"epoch": 0}]  # it returned only after the report was taken
    thread.join()


def test_worker_group_errors_start_with_the_prefix_we_strip():
    from ray.train import WorkerGroupError

    exc = WorkerGroupError("rank 1: ValueError: boom\nTraceback ...", {1: ValueError("boom")})
    assert str(exc).startswith(ray_compat.WORKER_GROUP_ERROR_PREFIX)
    assert ray_compat.worker_tracebacks(exc) == "rank 1: ValueError: boom\nTraceback ..."


def test_worker_env_vars_point_at_the_api_server_unless_the_user_did(monkeypatch):
    monkeypatch.delenv(ray_compat.API_SERVER_ENV_VAR, raising=False)
    assert ray_compat.worker_env_vars() == {}
    assert ray_compat.worker_env_vars(api_server="http://127.0.0.1:1") == {ray_compat.API_SERVER_ENV_VAR: "http://127.0.0.1:1"}
    monkeypatch.setenv(ray_compat.API_SERVER_ENV_VAR, "http://10.0.0.1:8265")
    assert ray_compat.worker_env_vars(api_server="http://127.0.0.1:1") == {ray_compat.API_SERVER_ENV_VAR: "http://10.0.0.1:8265"}
