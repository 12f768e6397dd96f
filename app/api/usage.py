"""``GET /v1/usage``: what tenants used, per UTC day (``app.tasks.usage``).

Who sees what: a user key, its own tenant; an admin key, every tenant (or the one ``?tenant=``
names); with auth off there are no tenants to tell apart, so every caller sees everything.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from app.api.deps import ApiKeyDep, TenantDep, TenantsDep
from app.errors import Forbidden, InvalidOptions
from app.schemas import ErrorBody
from app.tasks.usage import Figures, Report, UsageMeter, utc_today
from app.tenants import Tenant

DEFAULT_DAYS = 30
MAX_DAYS = 366

router = APIRouter(prefix="/v1", tags=["usage"], dependencies=[ApiKeyDep])


class UsageFigures(BaseModel):
    """Usage over a day or a whole span."""

    tasks: int = Field(description="Tasks that ended (any final status).")
    pages: int = Field(description="Pages recognised for those tasks.")
    prompt_tokens: int = Field(description="Tokens the engine read (0 where it cannot tell).")
    completion_tokens: int = Field(description="Tokens the engine generated.")
    engine_seconds: float = Field(
        description="Engine time: each page's share of its calls, retries included."
    )
    bytes_in: int = Field(description="Size of those tasks' documents.")
    bytes_out: int = Field(description="Result bytes the service sent (not those a bucket served).")

    @classmethod
    def of(cls, figures: Figures) -> UsageFigures:
        return cls(
            tasks=figures.tasks,
            pages=figures.pages,
            prompt_tokens=figures.prompt_tokens,
            completion_tokens=figures.completion_tokens,
            engine_seconds=round(figures.engine_seconds, 3),
            bytes_in=figures.bytes_in,
            bytes_out=figures.bytes_out,
        )


class UsageDay(UsageFigures):
    date: date


class TenantUsage(BaseModel):
    tenant: str | None = Field(description="The tenant's name; null for tasks made with auth off.")
    days: list[UsageDay] = Field(description="The days with any usage, oldest first.")
    total: UsageFigures


class UsageView(BaseModel):
    first: date = Field(alias="from", description="The first day counted (UTC).")
    last: date = Field(alias="to", description="The last day counted (UTC), inclusive.")
    tenants: list[TenantUsage]


async def get_usage(request: Request) -> UsageMeter:
    return request.app.state.usage


UsageDep = Annotated[UsageMeter, Depends(get_usage)]

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 403, 422, 503)}


@router.get("/usage", response_model=UsageView, response_model_by_alias=True, responses=_ERRORS)
async def read_usage(
    meter: UsageDep,
    caller: TenantDep,
    tenants: TenantsDep,
    first: Annotated[
        date | None, Query(alias="from", description="First UTC day; default: 29 days before `to`.")
    ] = None,
    last: Annotated[
        date | None, Query(alias="to", description="Last UTC day, inclusive; default: today.")
    ] = None,
    tenant: Annotated[str | None, Query(max_length=64, description="Admin keys: only this tenant.")] = None,
) -> UsageView:
    """Usage per UTC day: the caller's tenant, or every tenant for an admin key (366 days at most)."""
    last = last or utc_today()
    first = first or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise InvalidOptions(f"from ({first}) is after to ({last})")
    if (last - first).days + 1 > MAX_DAYS:
        raise InvalidOptions(f"from {first} to {last} spans more than {MAX_DAYS} days; ask for less")
    wanted = _visible(caller, tenant)
    report = await meter.report(first, last, wanted)
    # Named tenants are listed even without usage (a user sees its own zeros; an admin, idle tenants).
    listed = set(report) | set(wanted if wanted is not None else tenants.names())
    return _view(first, last, report, listed)


def _visible(caller: Tenant | None, tenant: str | None) -> list[str | None] | None:
    """The tenants whose usage ``caller`` asks for (``None``: every one); ``Forbidden`` for a user
    key naming another tenant."""
    if caller is not None and caller.role != "admin":
        if tenant not in (None, caller.name):
            raise Forbidden("only an admin key may read another tenant's usage")
        return [caller.name]
    return [tenant] if tenant is not None else None


def _view(first: date, last: date, report: Report, names: set[str | None]) -> UsageView:
    tenants = [
        TenantUsage(
            tenant=name,
            days=[
                UsageDay(date=day, **UsageFigures.of(figures).model_dump())
                for day, figures in sorted(report.get(name, {}).items())
            ],
            total=UsageFigures.of(sum(report.get(name, {}).values(), Figures())),
        )
        for name in sorted(names, key=lambda n: (n is not None, n or ""))  # no tenant first
    ]
    return UsageView.model_validate({"from": first, "to": last, "tenants": tenants})
