"""Named errors of the response cache (all subclass SpecacheError so the server maps them)."""

from specache.errors import SpecacheError


class ResponseCacheError(SpecacheError):
    """Base of response-cache errors a user can cause."""


class CacheConfigError(ResponseCacheError):
    """A response-cache option is out of range or the store URL is not understood."""


class CacheRequestError(ResponseCacheError):
    """A CacheRequest is malformed (e.g. messages is not a list of role/content dicts)."""


class StoreUnavailableError(ResponseCacheError):
    """The cache store (e.g. Redis) cannot be reached. The cache fails open on this error:
    the request is served by the model and counted as a miss."""

    status_code = 503
    error_type = "server_error"
