"""What upstream auction code imports: ``from producer import Publisher``."""

from cgrid.errors import CgridError, InvalidEvent, PublishFailed, RedisUnavailable
from cgrid.event import Event, Kind, Upstream
from producer.publisher import Publisher

__all__ = ["CgridError", "Event", "InvalidEvent", "Kind", "PublishFailed", "Publisher", "RedisUnavailable", "Upstream"]
