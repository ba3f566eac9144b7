"""Request bodies of the API, checked by pydantic: a malformed field is a 400 naming it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateRepo(_Body):
    name: str
    organization: str | None = None
    type: Literal["model", "dataset", "space"] | None = None
    private: bool | None = None
    visibility: Literal["private", "public"] | None = None


class DeleteRepo(_Body):
    name: str
    organization: str | None = None
    type: Literal["model", "dataset", "space"] | None = None


class Settings(_Body):
    private: bool | None = None
    visibility: Literal["private", "public", "protected"] | None = None


class Branch(_Body):
    startingPoint: str | None = None


class Tag(_Body):
    tag: str
    message: str | None = None


class PreuploadFile(_Body):
    path: str
    sample: str = ""
    size: int = Field(0, ge=0)


class Preupload(_Body):
    files: list[PreuploadFile] = Field(max_length=10000)


class Line(_Body):
    key: Literal["header", "file", "lfsFile", "deletedFile", "deletedFolder"]
    value: dict


class Header(_Body):
    summary: str = ""
    description: str = ""
    parentCommit: str | None = None


class FileOp(_Body):
    path: str
    content: str
    encoding: Literal["base64"] = "base64"


class LfsOp(_Body):
    path: str
    algo: Literal["sha256"] = "sha256"
    oid: str
    size: int = Field(ge=0)


class PathOp(_Body):
    path: str


class Yaml(_Body):
    content: str = ""


class Paths(_Body):
    paths: list[str] = []
