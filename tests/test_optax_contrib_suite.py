"""optax's own conformance suite for contributed optimizers, run on grassjax.

Every ``optax.contrib`` optimizer must pass ``optax/contrib/_common_test.py``:
extra keyword arguments accepted, no recompilation on the second call,
``optax.tree.map_params``, convergence on its four targets, ``MultiSteps``,
``inject_hyperparams``, dtype preservation (bfloat16 to float64), stability of
the state's shapes, dtypes and shardings under ``lax.cond``, and learning-rate
schedules. The suite is taken from the installed optax as it is: its tests are
kept whole and only its list of optimizers is replaced by grassjax's, as
optax lists its own. A grassjax optimizer's structural arguments join the
suite's list of arguments that ``inject_hyperparams`` must leave static, as
galore's ``rank`` and ``update_proj_gap`` are there.

Every test of the suite runs, on every preset and on ``low_rank_adamw`` with a
non-default rule and options; none is skipped.
"""

import importlib.util
import pathlib

import jax

import grassjax
from grassjax import subspace

_SUITE = (
  pathlib.Path(
    importlib.util.find_spec("optax.contrib").submodule_search_locations[0]
  )
  / "_common_test.py"
)

# grassjax's arguments that fix the structure of the state (or are a PRNG key)
# and so cannot be traced hyperparameters.
_STATIC_ARGUMENTS = ("key", "tangent_rank")

# Rank 1 (the targets' matrices are 2 x 2, so a rank-1 subspace is a real
# projection), a basis update every 10 steps so that the suite's runs see many
# of them, and a typed key for the random rules.
_KEY = jax.random.key(0)
_OPTIMIZERS = (
  {"opt_name": "galore", "opt_kwargs": {"learning_rate": 1e-2, "rank": 1}},
  {
    "opt_name": "grasswalk",
    "opt_kwargs": {"learning_rate": 1e-2, "rank": 1, "key": _KEY},
  },
  {
    "opt_name": "grassjump",
    "opt_kwargs": {"learning_rate": 1e-2, "rank": 1, "key": _KEY},
  },
  {
    "opt_name": "subtrack_pp",
    "opt_kwargs": {"learning_rate": 1e-2, "rank": 1},
  },
  {
    "opt_name": "low_rank_adamw",
    "opt_kwargs": {
      "learning_rate": 1e-2,
      "rule": subspace.random_walk(step_size=0.5, tangent_rank=1),
      "rank": 1,
      "key": _KEY,
      "update_interval": 10,
      "projected_side": "longer",
      "weight_decay": 1e-4,
      "stagger": True,
    },
  },
)
for _optimizer in _OPTIMIZERS:
  _optimizer.update(wrapper_name=None, wrapper_kwargs=None)


def _get_opt_factory(opt_name):
  return getattr(grassjax, opt_name)


def _load_suite() -> type:
  """optax's ``ContribTest``, parameterized over grassjax's optimizers.

  The suite's parameterizations are evaluated when its class is defined, so
  its module is run in two parts: what precedes the class, then (with the
  optimizer list and factory replaced) the class itself, compiled under the
  suite's own file name and line numbers so that tracebacks point into it.
  """
  source = _SUITE.read_text()
  head, sep, body = source.partition("\nclass ContribTest(")
  static_list = "'rank', 'update_proj_gap'"
  if not sep or body.count(static_list) != 1:
    raise RuntimeError(
      f"{_SUITE} is not laid out as this test expects (a ContribTest class"
      f" listing {static_list} as static arguments): update this test for"
      " the installed optax."
    )
  ours = ", ".join(repr(name) for name in _STATIC_ARGUMENTS)
  body = body.replace(static_list, f"{static_list}, {ours}")
  namespace = {"__name__": "optax_contrib_common_test"}
  exec(compile(head, str(_SUITE), "exec"), namespace)
  namespace.update(
    _MAIN_OPTIMIZERS_UNDER_TEST=_OPTIMIZERS,
    _ALL_OPTIMIZERS_UNDER_TEST=_OPTIMIZERS,
    _get_opt_factory=_get_opt_factory,
  )
  padding = "\n" * head.count("\n")
  exec(compile(padding + sep + body, str(_SUITE), "exec"), namespace)
  return namespace["ContribTest"]


ContribTest = _load_suite()
