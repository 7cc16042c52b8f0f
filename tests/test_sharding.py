"""A sharded run over 4 host devices equals the unsharded run.

XLA's host device count must be set before JAX starts, so the check runs in a
subprocess with ``--xla_force_host_platform_device_count=4``.
"""

import textwrap

import grassjax
from tests import host_devices

SCRIPT = textwrap.dedent(
  """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import grassjax

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    key = jax.random.key(0)
    params = {
        "w": jax.random.normal(key, (16, 32)),
        "tall": jax.random.normal(key, (32, 12)),
        "stack": jax.random.normal(key, (4, 8, 24)),
        "b": jnp.zeros((32,)),
    }
    specs = {
        "w": P(None, "x"),
        "tall": P("x", None),
        "stack": P(None, None, "x"),
        "b": P("x"),
    }
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}

    def grads(step):
        # Gradient-sized entries: SubTrack++'s raw step turns the tangent's
        # norm into an angle, so unit-scale entries would spin the basis by
        # thousands of radians and amplify rounding differences.
        k = jax.random.fold_in(key, step)
        return {n: 0.02 * jax.random.normal(jax.random.fold_in(k, i), p.shape)
                for i, (n, p) in enumerate(sorted(params.items()))}

    optimizers = {
        name: info.constructor(
            1e-2, rank=4, key=key if info.needs_key else None, update_interval=2
        )
        for name, info in grassjax.OPTIMIZERS.items()
    }
    for name, tx in optimizers.items():
        def run(params, shard):
            put = (
                (lambda t: jax.device_put(t, shardings))
                if shard
                else (lambda t: t)
            )
            params = put(params)
            state = jax.jit(tx.init)(params)
            update = jax.jit(tx.update, donate_argnums=1)
            for step in range(5):
                updates, state = update(put(grads(step)), state, params)
            return updates, state

        single = jax.device_put(params, jax.devices()[0])
        ref_updates, ref_state = run(single, shard=False)
        updates, state = run(params, shard=True)
        inner = state[0]
        # A stacked leaf sharded on a matrix axis (the FSDP layout) keeps its
        # moments sharded the same way: the loop over the stack runs locally.
        assert inner.mu["stack"].sharding.spec[-1] == "x", (
            name,
            inner.mu["stack"].sharding,
        )
        assert len(updates["w"].sharding.device_set) == 4
        for a, b in zip(
            jax.tree.leaves((updates, state)),
            jax.tree.leaves((ref_updates, ref_state)),
        ):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name
            )
        print(name, "ok")
    """
)


def test_sharded_run_equals_unsharded_run():
  stdout = host_devices.run_script(SCRIPT)
  for name in grassjax.OPTIMIZERS:
    assert f"{name} ok" in stdout
