"""What an operator gives the inbound service (numbers, webhook URLs): refused with a
ValidationError naming the field, nothing written; both databases."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.db import transaction
from dispatcher.errors import ValidationError
from dispatcher.inbound import service
from dispatcher.inbound.models import InboundNumber, InboundWebhook
from tests.factories import Tenant


@pytest.mark.parametrize(
    "number",
    [
        "\u0664\u0664\u0667\u0667\u0660\u0660\u0669\u0660\u0660\u0661\u0662\u0663",  # Arabic-Indic
        "\uff14\uff14\uff17\uff17\uff10\uff10\uff19\uff10\uff10\uff11\uff12\uff13",  # fullwidth
        "1" * 32,  # 33 characters once written with its +
        "",
        "+",
    ],
)
def test_a_number_no_message_can_come_to_is_refused(
    sessions: sessionmaker[Session], tenant: Tenant, number: str
) -> None:
    with pytest.raises(ValidationError) as refused, transaction(sessions) as session:
        service.assign_number(session=session, number=number, account_id=tenant.id)
    assert refused.value.field == "number"
    with sessions() as session:
        assert (
            session.scalars(
                select(InboundNumber).where(InboundNumber.account_id == tenant.id)
            ).all()
            == []
        )


def test_a_webhook_url_longer_than_stored_is_refused(
    sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    url = "http://127.0.0.1:9/" + "a" * 2048
    with pytest.raises(ValidationError) as refused, transaction(sessions) as session:
        service.set_webhook(
            session=session, account_id=tenant.id, url=url, dialect="sinch", allow=("127.0.0.1",)
        )
    assert refused.value.field == "url"
    with sessions() as session:
        assert session.get(InboundWebhook, tenant.id) is None
