"""The backends: plug-ins, each a pure planner registered by its ``Backend.Type``.

Installed as ``flanneld.backends``. The contract they implement (``Backend``, ``PeerPlan``,
``register``/``lookup``) lives in :mod:`flanneld.plan.backend`, which imports a backend's module
here the first time its type is looked up.
"""
