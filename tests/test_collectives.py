"""No gathered gradient in a sharded update step, except for the exact SVD.

Under FSDP each gradient matrix is split over the devices. The random rules
need no gradient after the first step, tracking needs only products with it,
and the randomized range finder makes a basis from products too: their
compiled update steps must never all-gather an ``(m, n)``-sized array. The
exact SVD does (its solver needs the whole matrix), which shows the check can
fail. XLA's host device count is fixed when JAX starts, so the check runs in a
subprocess with four host devices.
"""

import textwrap

import grassjax
from tests import host_devices

SCRIPT = textwrap.dedent(
  """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    import grassjax
    from benchmarks.collectives import collectives, fsdp_shardings

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    m, n = 64, 256
    params = {
        "wide": jax.ShapeDtypeStruct((m, n), jnp.float32),
        "tall": jax.ShapeDtypeStruct((n, m), jnp.float32),
        "stack": jax.ShapeDtypeStruct((2, m, n), jnp.float32),
        "bias": jax.ShapeDtypeStruct((n,), jnp.float32),
    }
    key = jax.random.key(0)
    randomized = dict(key=key, svd_method="randomized")
    optimizers = {
        "galore (exact SVD)": grassjax.galore(1e-3, rank=8),
        "galore": grassjax.galore(1e-3, rank=8, **randomized),
        "grasswalk": grassjax.grasswalk(1e-3, rank=8, **randomized),
        "grassjump": grassjax.grassjump(1e-3, rank=8, key=key),
        "subtrack_pp": grassjax.subtrack_pp(1e-3, rank=8, **randomized),
    }
    for name, tx in optimizers.items():
        state = jax.eval_shape(tx.init, params)
        ps, ss = fsdp_shardings(params, mesh), fsdp_shardings(state, mesh)
        update = jax.jit(
            tx.update, in_shardings=(ps, ss, ps), out_shardings=(ps, ss)
        )
        found = collectives(
            update.lower(params, state, params).compile().as_text()
        )
        gathered = max(
            (c.largest_elements for c in found if c.kind == "all-gather"),
            default=0,
        )
        print(f"{name}: {len(found)} collectives, largest gather {gathered}")
  """
)


def test_only_the_exact_svd_gathers_a_gradient():
  stdout = host_devices.run_script(SCRIPT)
  largest = {
    line.split(":")[0]: int(line.rsplit(" ", 1)[1])
    for line in stdout.splitlines()
  }
  matrix = 64 * 256
  assert largest["galore (exact SVD)"] >= matrix, stdout
  for name in grassjax.OPTIMIZERS:
    assert largest[name] < matrix, stdout
