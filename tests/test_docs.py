from pipeline import docs
from pipeline.config import Config


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def test_committed_config_reference_is_current():
    assert docs.REFERENCE.read_text() == docs.render(), "docs/config.md is stale: run `make docs`"


def test_every_config_key_has_a_row_with_its_default():
    text = docs.render()
    for key in _leaf_keys(Config().to_dict()):
        assert f"| `{key}` |" in text, key
    assert "| `train.epochs` | `int`, > 0 | `10` |" in text


SOURCE = '''
from pydantic import BaseModel, Field


class Section(BaseModel):
    a: int = 1  # said beside it
    # said above it,
    # over two lines
    b: str = "x"
    c: bool = Field(True, description="said in the field")  # said beside the field
    d: int = Field(0, ge=0)


class Root(BaseModel):
    top: str = "t"  # a top-level key
    section: Section = Section()
'''


def test_meaning_comes_from_the_description_then_the_comment_then_the_lines_above():
    names: dict = {}
    exec(compile(SOURCE, "models.py", "exec"), names)
    text = docs.render(SOURCE, names["Root"])
    assert "| `top` | `str` | `t` | a top-level key |" in text
    assert "| `section.a` | `int` | `1` | said beside it |" in text
    assert "| `section.b` | `str` | `x` | said above it, over two lines |" in text
    assert "| `section.c` | `bool` | `true` | said in the field |" in text
    assert "| `section.d` | `int`, >= 0 | `0` |  |" in text


def test_check_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("old\n")
    assert docs.main(["--check", "--out", str(stale)]) == 1
    assert "make docs" in capsys.readouterr().err
    assert docs.main(["--out", str(stale)]) == 0
    assert docs.main(["--check", "--out", str(stale)]) == 0
