"""`aftrec prepare` through each source gives the same prepared data as the generic path."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aftrec.cli import main
from aftrec.data.sources.synthetic import SyntheticConfig, generate

CFG = SyntheticConfig(
    n_users=150, n_domains=5, items_per_domain=40, n_interactions=5_000, n_topics=4, seed=3
)
GENRES = {"d0": "Romance", "d1": "Thriller", "d2": "Action", "d3": "Comedy", "d4": "Drama"}


@pytest.fixture(scope="module")
def log() -> tuple[pd.DataFrame, pd.DataFrame]:
    raw = generate(CFG)
    inter = raw.interactions.loc[:, ["user", "item", "timestamp"]].copy()
    # ratings 1..5 so that the >= 3 rule matters
    inter["rating"] = (np.arange(len(inter)) % 5 + 1).astype(float)
    items = raw.items.assign(domain=raw.items["domain"].astype(str))
    return inter, items


def parts(out: Path) -> dict[str, pd.DataFrame]:
    users = pd.read_parquet(out / "users.parquet").set_index("user_idx")["user"]
    items = pd.read_parquet(out / "items.parquet").set_index("item_idx")
    got = {}
    for name in ("train", "valid", "test"):
        frame = pd.read_parquet(out / f"{name}.parquet")
        got[name] = pd.DataFrame(
            {
                "user": users.loc[frame["user_idx"]].astype(str).to_numpy(),
                "item": items["item"].loc[frame["item_idx"]].astype(str).to_numpy(),
                "domain": items["domain"].loc[frame["item_idx"]].to_numpy(),
            }
        ).sort_values(["user", "item"], ignore_index=True)
    return got


def prepare(*args: str | Path) -> Path:
    out = Path(args[-1])
    assert main(["prepare", *map(str, args[:-1]), "--out", str(out)]) == 0
    return out


def test_synthetic_source(tmp_path: Path) -> None:
    out = prepare("--dataset", "synthetic", "--users", "150", "--n-domains", "3",
                  "--items-per-domain", "60", "--interactions-count", "4000", "--seed", "3",
                  tmp_path / "s")  # fmt: skip
    meta = pd.read_json(out / "meta.json", typ="series")
    assert meta["domains"] == ["d0", "d1", "d2"] and 0 < meta["n_users"] <= 150


def test_netflix_source_equals_generic(tmp_path: Path, log) -> None:
    inter, items = log
    # day resolution, as in the Netflix files (ties broken the same way in both paths)
    inter = inter.assign(timestamp=(inter["timestamp"] // 86400) * 86400)
    raw = tmp_path / "netflix"
    raw.mkdir()
    dates = pd.to_datetime(inter["timestamp"], unit="s").dt.strftime("%Y-%m-%d")
    lines = []
    for movie, group in inter.assign(date=dates).groupby("item"):
        lines.append(f"{movie}:")
        lines += [f"{u},{int(r)},{d}" for u, r, d in zip(group["user"], group["rating"],
                                                         group["date"], strict=True)]  # fmt: skip
    half = len(lines) // 2
    while not lines[half].endswith(":"):
        half += 1
    (raw / "combined_data_1.txt").write_text("\n".join(lines[:half]) + "\n")
    (raw / "combined_data_2.txt").write_text("\n".join(lines[half:]) + "\n")
    titles = [f"{m},2000,Movie {m}, a title with a comma" for m in items["item"]]
    (raw / "movie_titles.csv").write_text("\n".join(titles) + "\n")
    items.to_csv(raw / "map.csv", index=False)
    inter.to_csv(tmp_path / "inter.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    a = prepare("--dataset", "netflix", "--path", raw, "--domains", raw / "map.csv", tmp_path / "n")
    b = prepare("--interactions", tmp_path / "inter.csv", "--items", tmp_path / "items.csv",
                tmp_path / "g")  # fmt: skip
    for name, frame in parts(a).items():
        pd.testing.assert_frame_equal(frame, parts(b)[name])


def test_movielens_folder_equals_generic(tmp_path: Path, log) -> None:
    inter, items = log
    raw = tmp_path / "ml"
    raw.mkdir()
    movies = [f"{m}::Movie {m} (2000)::Drama|{GENRES[d]}" for m, d in zip(items["item"],
              items["domain"], strict=True)]  # fmt: skip
    (raw / "movies.dat").write_text("\n".join(movies) + "\n")
    ratings = [f"{u}::{m}::{int(r)}::{t}" for u, m, t, r in inter.itertuples(index=False)]
    (raw / "ratings.dat").write_text("\n".join(ratings) + "\n")
    a = prepare("--dataset", "ml-1m", "--path", raw, tmp_path / "m")
    inter.to_csv(tmp_path / "inter.csv", index=False)
    items.assign(domain=items["domain"].map(GENRES)).to_csv(tmp_path / "items.csv", index=False)
    b = prepare("--interactions", tmp_path / "inter.csv", "--items", tmp_path / "items.csv",
                tmp_path / "g")  # fmt: skip
    meta = pd.read_json(a / "meta.json", typ="series")
    assert meta["domains"] == list(GENRES.values())  # the preset's order, not the file's
    for name, frame in parts(a).items():
        pd.testing.assert_frame_equal(frame, parts(b)[name])
