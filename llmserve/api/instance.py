"""The admin key's instance controls: warm standby on and off (``llmserve.standby``).

``GET /v1/admin/instance`` says whether this instance is in standby; ``POST /v1/admin/activate`` lets the
balancers send it traffic (its agent check answers ``ready`` again at the next check) and ``POST
/v1/admin/standby`` stops them, its models staying loaded and warm. The same as ``llmserve activate`` and
``llmserve standby``.
"""

from __future__ import annotations

import socket

from flask import Blueprint, Response, jsonify

from llmserve.api.openapi import Operation, documented
from llmserve.api.request import server_settings
from llmserve.standby import Standby
from llmserve.tenancy import require_admin

blueprint = Blueprint("instance", __name__)
blueprint.before_request(require_admin)


def _view(standby: Standby) -> Response:
    return jsonify({"object": "instance", "host": socket.gethostname(), "standby": standby.on})


@blueprint.get("/v1/admin/instance")
@documented(Operation("This instance: whether it is in warm standby (admin key)", errors=(403,)))
def instance() -> Response:
    return _view(Standby(server_settings().state_dir))


def _switched(on: bool) -> Response:
    standby = Standby(server_settings().state_dir)
    standby.set(on)
    return _view(standby)


@blueprint.post("/v1/admin/activate")
@documented(Operation("Leave warm standby: the balancers send traffic again (admin key)", errors=(403,)))
def activate() -> Response:
    return _switched(False)


@blueprint.post("/v1/admin/standby")
@documented(Operation("Enter warm standby: no new traffic, the models stay warm (admin key)", errors=(403,)))
def enter_standby() -> Response:
    return _switched(True)
