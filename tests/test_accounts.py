"""Account settings an operator gives: a rate the sender cannot use is refused, nothing written."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.accounts import service as accounts
from dispatcher.accounts.models import Account
from dispatcher.db import transaction
from dispatcher.errors import ValidationError


@pytest.mark.parametrize("rate", [-1.0, -0.001, math.nan, math.inf, -math.inf])
def test_a_rate_the_sender_cannot_use_is_refused(
    sessions: sessionmaker[Session], rate: float
) -> None:
    with sessions() as session:
        before = session.scalar(select(func.count()).select_from(Account))
    with pytest.raises(ValidationError, match="rate"), transaction(sessions) as session:
        accounts.create_account(session=session, name="careless", rate_limit=rate)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Account)) == before


@pytest.mark.parametrize("rate", [None, 0.0, 0.5, 1e6])
def test_zero_none_and_positive_rates_are_kept(
    sessions: sessionmaker[Session], rate: float | None
) -> None:
    with transaction(sessions) as session:
        account = accounts.create_account(session=session, name="careful", rate_limit=rate)
    assert account.rate_limit == rate
