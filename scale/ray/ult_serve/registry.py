"""The residency routers alive in this process, for the ingress's GET /ult/routing.

It lives apart from router.py on purpose: Ray Serve cloudpickles the request-router class *by value*
(RequestRouterConfig registers its module for pickling by value), so module-level state of router.py is a
private copy inside the deserialized class; this module is imported by reference, so every copy shares it.
"""

import weakref

ROUTERS: "weakref.WeakSet" = weakref.WeakSet()
