"""The app's settings and the replica's health, without a cluster: the yaml's engine block is
validated by IceCacheConfig itself, and a replica whose scheduler died fails its health
check while its requests end with UNAVAILABLE."""

import pytest
import torch
from pydantic import ValidationError

from deploy.config import AppArgs
from deploy.errors import as_request_error
from deploy.llm import IceCacheLLM
from icecache import Engine, IceCacheConfig
from icecache.testing import random_model, tiny_config
from icecache.scheduler import SchedulerDead


def test_the_engine_block_reaches_every_config_field_and_is_validated_by_it():
    args = AppArgs(token_budget=128, engine={"rerank": 2, "page_size": 8, "promotion_ratio": [0.05, 0.2],
                                             "index_chunk_tokens": 2048})
    assert args.engine_config() == IceCacheConfig(token_budget=128, rerank=2, page_size=8,
                                                  promotion_ratio=(0.05, 0.2), index_chunk_tokens=2048)
    with pytest.raises(ValidationError, match="rerank: must be a positive int"):
        AppArgs(engine={"rerank": 0})
    with pytest.raises(ValidationError, match="engine: .*'no_such_field'"):
        AppArgs(engine={"no_such_field": 1})
    with pytest.raises(ValidationError, match="warmup_tokens"):
        AppArgs(warmup_tokens=-1)
    with pytest.raises(ValidationError, match="context_length"):
        AppArgs(context_length=0)
    assert AppArgs(context_length=32768).context_length == 32768


def test_a_replica_whose_scheduler_died_fails_its_health_check(monkeypatch):
    model = random_model(tiny_config("llama", num_hidden_layers=2), torch.device("cpu"), torch.float32)
    scheduler = Engine.from_model(model, config=IceCacheConfig(), model_id="tiny").scheduler()
    replica = IceCacheLLM.func_or_class.__new__(IceCacheLLM.func_or_class)  # the class alone, no Serve
    replica.scheduler = scheduler
    with pytest.raises(RuntimeError, match="scheduler thread is not running"):
        replica.check_health()  # never started
    scheduler.start()
    replica.check_health()
    scheduler.call(lambda: None).result(timeout=30)

    def fault():
        raise SystemError("injected")  # escapes the step: what a broken device looks like to the loop

    monkeypatch.setattr(scheduler, "_admit", fault)
    scheduler.call(lambda: None)  # wakes the loop: the call runs, then the step fails
    scheduler._thread.join(30)
    assert not scheduler._thread.is_alive()
    with pytest.raises(SchedulerDead, match="SystemError"):
        scheduler.call(lambda: None)
    with pytest.raises(RuntimeError, match="SystemError"):
        replica.check_health()
    error = as_request_error(SchedulerDead("the scheduler stopped after a failed step"))
    assert error.code == "UNAVAILABLE" and "retry" in error.message
