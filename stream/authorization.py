"""Kafka ACLs: what the brokers let the service's principal do, checked before it joins.

On a cluster with an authoriser, a principal that may not do something the service needs met
aiokafka's errors at run time instead of one line at start (found by running the service as
a restricted user on Apache Kafka 4.0 with ``StandardAuthorizer``, ``docs/startup.md``):
an input topic it may not describe was reported as missing ("create it"); a group it may not
read was retried for ever (``GroupAuthorizationFailedError`` every 0.5 s); a state topic it
may not read ended the service with a traceback during recovery, and an output topic it may
not write failed the first batch.

The check asks the brokers what they allow, without doing any of it: one metadata request
(version 8, whose answer carries each topic's authorised operations for the principal that
asks) and the group's authorised operations in ``preflight.await_group_coordinator``'s
DescribeGroups. A broker that does not report them (no version 8, or the "not provided"
value) is not checked, and the service meets its refusals as before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiokafka.errors import (
    GroupAuthorizationFailedError,
    IncompatibleBrokerVersion,
    KafkaError,
    TopicAuthorizationFailedError,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Bytes, Int16, Int32, Schema, String

from meterwatch.stream.config import Settings
from meterwatch.stream.errors import ConfigurationError

if TYPE_CHECKING:
    from aiokafka.admin import AIOKafkaAdminClient

log = logging.getLogger(__name__)

#: Kafka's ACL operation codes (``AclOperation``); an authorised-operations field has bit
#: ``code`` set for each operation allowed.
READ, WRITE, DESCRIBE = 3, 4, 8
_NAMES = {READ: "READ", WRITE: "WRITE", DESCRIBE: "DESCRIBE"}
#: A broker's "authorised operations not provided" (INT32_MIN).
NOT_PROVIDED = -(2**31)


class _MetadataResponseV8(Response):
    API_KEY = 3
    API_VERSION = 8
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("brokers", Array(("node_id", Int32), ("host", String("utf-8")), ("port", Int32),
                          ("rack", String("utf-8")))),
        ("cluster_id", String("utf-8")),
        ("controller_id", Int32),
        ("topics", Array(
            ("error_code", Int16), ("topic", String("utf-8")), ("is_internal", Boolean),
            ("partitions", Array(
                ("error_code", Int16), ("partition", Int32), ("leader", Int32),
                ("leader_epoch", Int32), ("replicas", Array(Int32)), ("isr", Array(Int32)),
                ("offline_replicas", Array(Int32)))),
            ("topic_authorized_operations", Int32))),
        ("cluster_authorized_operations", Int32),
    )


class _MetadataRequestV8(RequestStruct):
    API_KEY = 3
    API_VERSION = 8
    RESPONSE_TYPE = _MetadataResponseV8
    SCHEMA = Schema(
        ("topics", Array(String("utf-8"))),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
    )


class AuthorizedTopicsRequest(Request[_MetadataRequestV8]):
    """Metadata of ``topics`` with their authorised operations, never creating one."""

    API_KEY = 3

    def __init__(self, topics: list[str]) -> None:
        self._topics = topics

    def build(self, request_struct_class: type[_MetadataRequestV8]) -> _MetadataRequestV8:
        return request_struct_class(self._topics, False, False, True)


class _DescribeGroupsResponseV3(Response):
    API_KEY = 15
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("groups", Array(
            ("error_code", Int16), ("group", String("utf-8")), ("state", String("utf-8")),
            ("protocol_type", String("utf-8")), ("protocol", String("utf-8")),
            ("members", Array(
                ("member_id", String("utf-8")), ("client_id", String("utf-8")),
                ("client_host", String("utf-8")), ("member_metadata", Bytes),
                ("member_assignment", Bytes))),
            ("authorized_operations", Int32))),
    )


class _DescribeGroupsRequestV3(RequestStruct):
    API_KEY = 15
    API_VERSION = 3
    # (aiokafka 0.14's own v3 request reads its answer as v2's: without the field)
    RESPONSE_TYPE = _DescribeGroupsResponseV3
    SCHEMA = Schema(("groups", Array(String("utf-8"))),
                    ("include_authorized_operations", Boolean))


class AuthorizedGroupRequest(Request[_DescribeGroupsRequestV3]):
    """DescribeGroups of one group with its authorised operations."""

    API_KEY = 15

    def __init__(self, group: str) -> None:
        self._group = group

    def build(self, request_struct_class: type[_DescribeGroupsRequestV3]
              ) -> _DescribeGroupsRequestV3:
        return request_struct_class([self._group], True)


async def describe_group(admin: AIOKafkaAdminClient, group: str) -> list[tuple[int, int]]:
    """(error code, authorised operations) of ``group`` from its coordinator; the
    operations are ``NOT_PROVIDED`` where the broker has no DescribeGroups v3."""
    node = await admin.find_coordinator(group)
    client: Any = admin._client
    try:
        answer = await client.send(node, AuthorizedGroupRequest(group))
    except IncompatibleBrokerVersion:
        answers = await admin.describe_consumer_groups([group], group_coordinator_id=node)
        return [(g[0], NOT_PROVIDED) for a in answers for g in a.groups]
    return [(g[0], g[-1]) for g in answer.groups]


def allowed(operations: int, op: int) -> bool | None:
    """Whether an authorised-operations field allows ``op``; None when not provided."""
    if operations == NOT_PROVIDED:
        return None
    return bool(operations & (1 << op))


def topic_needs(s: Settings) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each topic of the service -> (its setting, the operations the service performs on
    it): the input is read; the outputs are written, and those recovery reads back (scores,
    alerts, data quality, state) are read too; dead letters are only written."""
    read_write = (READ, WRITE)
    return {
        s.input_topic: ("--input-topic", (READ,)),
        s.scores_topic: ("--scores-topic", read_write),
        s.alerts_topic: ("--alerts-topic", read_write),
        s.data_quality_topic: ("--data-quality-topic", read_write),
        s.state_topic: ("--state-topic", read_write),
        s.dead_letter_topic: ("--dead-letter-topic", (WRITE,)),
    }


def _grant(flag: str, what: str, missing: list[int], s: Settings) -> ConfigurationError:
    ops = " and ".join(_NAMES[o] for o in missing)
    return ConfigurationError(
        flag, f"the brokers do not allow {_principal(s)} {ops} on {what}",
        f"grant {ops} on it to that principal (an ACL), or give a {what.split()[0]} it may use")


def _principal(s: Settings) -> str:
    if s.security_protocol.startswith("SASL") and s.sasl_username:
        return f"user {s.sasl_username!r}"
    return "this client"


async def check_topics_authorized(settings: Settings, admin: AIOKafkaAdminClient) -> None:
    """``ConfigurationError`` naming the setting of the first topic the brokers do not let
    this principal read or write as the service will (``topic_needs``)."""
    needs = topic_needs(settings)
    client: Any = admin._client  # (the admin client has no request for this)
    try:
        answer = await client.send(client.get_random_node(),
                                   AuthorizedTopicsRequest(list(needs)))
    except IncompatibleBrokerVersion:
        log.debug("the broker does not report authorised operations (metadata v8)")
        return
    except KafkaError as exc:
        log.debug("authorised operations not known: %r", exc)
        return
    answered = {t[1]: (t[0], t[4]) for t in answer.topics}
    for topic, (flag, ops) in needs.items():  # the input first
        if topic not in answered:
            continue
        code, operations = answered[topic]
        if code == TopicAuthorizationFailedError.errno:  # not even DESCRIBE
            raise _grant(flag, f"topic {topic!r}", list(ops), settings)
        if not _consistent(code, operations):
            continue
        missing = [op for op in ops if allowed(operations, op) is False]
        if missing:
            raise _grant(flag, f"topic {topic!r}", missing, settings)


def _consistent(code: int, operations: int) -> bool:
    """Whether an answer's operations can be believed: what was described without error
    was allowed DESCRIBE (READ and WRITE imply it). An authoriser that reports otherwise
    is not checked rather than trusted to refuse a working setup."""
    if code == 0 and allowed(operations, DESCRIBE) is False:
        log.debug("authorised operations %d without DESCRIBE: not checked", operations)
        return False
    return True


def check_group_authorized(settings: Settings, operations: int) -> None:
    """``ConfigurationError`` naming ``--group-id`` when the group's authorised operations
    (from DescribeGroups) do not include READ, which joining and committing need."""
    if _consistent(0, operations) and allowed(operations, READ) is False:
        raise group_refused(settings)


def group_refused(settings: Settings) -> ConfigurationError:
    """The brokers refused to describe the group (GROUP_AUTHORIZATION_FAILED)."""
    return _grant("--group-id", f"group {settings.group_id!r}", [READ], settings)


def refusal(settings: Settings, exc: BaseException) -> ConfigurationError | None:
    """The setting and grant behind an authorisation error met at run time (a broker that
    does not report operations, or an ACL removed while the service runs), as the check
    words it; None for any other error. Fetching from a group it may not read was retried
    for ever, and recovery from a topic it may not read ended with a traceback."""
    if isinstance(exc, GroupAuthorizationFailedError):
        return group_refused(settings)
    if not isinstance(exc, TopicAuthorizationFailedError):
        return None
    named = exc.args[0] if exc.args else ()
    topics = {named} if isinstance(named, str) else set(named)
    needs = topic_needs(settings)
    for topic, (flag, ops) in needs.items():
        if topic in topics:
            return _grant(flag, f"topic {topic!r}", list(ops), settings)
    return None
