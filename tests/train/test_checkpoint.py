"""orbax checkpoints: round trip, keep-last-K, and an interrupted write is never picked up."""

import os

import jax.numpy as jnp
import numpy as np
import optax

from trlax.train.checkpoint import Checkpointer
from trlax.train.step import init_train_state


def _state(seed):
    params = {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(4, 3)), jnp.float32)}
    return init_train_state(params, optax.adam(1e-3))


def test_round_trip_and_keep_last(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), save_every=1, keep=2)
    for step in (1, 2, 3):
        ck.save(step, _state(step), {"data": {"epoch": 0, "offset": step}})
    ck.wait()
    assert ck.all_steps() == [2, 3]
    step, state, meta = ck.restore(_state(0))
    assert step == 3 and meta["data"]["offset"] == 3
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(_state(3).params["w"]))
    ck.close()


def test_interrupted_write_is_not_valid(tmp_path):
    d = tmp_path / "ck"
    ck = Checkpointer(str(d), save_every=1, keep=3)
    ck.save(1, _state(1), {"k": 1})
    ck.close()
    # simulate a crash mid-write of step 2: orbax writes into a temporary directory first and only a
    # finished write is renamed to its final step name.
    tmp = d / "2.orbax-checkpoint-tmp-1234"
    os.makedirs(tmp / "state")
    (tmp / "state" / "partial").write_bytes(b"\x00" * 10)
    ck2 = Checkpointer(str(d), save_every=1, keep=3)
    assert ck2.latest_step() == 1
    step, _, meta = ck2.restore(_state(0))
    assert step == 1 and meta == {"k": 1}
    ck2.close()
