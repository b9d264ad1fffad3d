"""The .mat parser, the age rule, every filter, the cap and the split, on generated .mat files."""
import datetime as dt

import numpy as np
import pytest

import pre_process as pp
from synth_imdb import matlab_datenum, write_mat
from utils import UserError


def make_mat(tmp_path, rows, celeb_names=("A", "B", "C")):
    """rows: dicts with dob (date), taken, gender, score, second, cid, path; writes imdb.mat + files."""
    fields = {k: [] for k in ("dob", "photo_taken", "full_path", "gender", "name", "face_location",
                              "face_score", "second_face_score", "celeb_id")}
    for i, r in enumerate(rows):
        path = r.get("path", f"{i % 100:02d}/nm{r.get('cid', 1):07d}_rm{i}_x_{r['taken']}.jpg")
        fields["dob"].append(matlab_datenum(r["dob"]))
        fields["photo_taken"].append(r["taken"])
        fields["full_path"].append(path)
        fields["gender"].append(r.get("gender", 1.0))
        fields["name"].append("n")
        fields["face_location"].append(np.array([[10, 20, 110, 140]], dtype=np.uint16))
        fields["face_score"].append(r.get("score", 3.0))
        fields["second_face_score"].append(r.get("second", np.nan))
        fields["celeb_id"].append(r.get("cid", 1))
        if r.get("exists", True):
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_bytes(b"x")
    write_mat(tmp_path / "imdb.mat", fields, list(celeb_names))
    return tmp_path / "imdb.mat"


def test_loadmat_layout_and_dtypes(tmp_path):
    mat = make_mat(tmp_path, [dict(dob=dt.date(1970, 3, 1), taken=2000, cid=2)] * 3)
    import scipy.io
    s = scipy.io.loadmat(mat)["imdb"][0, 0]
    # the real file's shapes and integer types, which the parser must cast before arithmetic
    assert s["dob"].shape == (1, 3) and s["dob"].dtype == np.int32
    assert s["photo_taken"].dtype == np.uint16 and s["celeb_id"].dtype == np.uint16
    assert s["face_location"][0, 0].dtype == np.uint16
    assert s["celeb_names"].shape == (1, 3)
    name, meta = pp.load_meta(mat)
    assert name == "imdb" and list(meta.identity) == ["2", "2", "2"]
    assert meta.photo_taken.dtype == np.int64 and meta.full_path[0].startswith("00/nm0000002")


def test_write_mat_writes_what_scipy_savemat_writes(tmp_path):
    """synth_imdb.write_mat, our level-5 writer, gives savemat's bytes (after the header's date) for the layout:
    strings short enough to pack into a tag and longer ones, non-ASCII, empty; NaN, -inf and every dtype."""
    import scipy.io
    rows = 5
    fields = dict(dob=[718000 + i for i in range(rows)], photo_taken=[2000 + i for i in range(rows)],
                  full_path=["01/a.jpg", "b", "02/nm0000003_rm1_1970-1-1_2000.jpg", "abcd", "abcde"],
                  gender=[1.0, 0.0, np.nan, 1.0, 0.0], name=["Zoë Saldaña", "", "n", "Björk", "A B"],
                  face_location=[np.array([[i, 2 * i, 3 * i, 65535]], dtype=np.uint16) for i in range(rows)],
                  face_score=[3.5, -np.inf, 1.0, 2.0, 4.0], second_face_score=[np.nan, 1.5, np.nan, np.nan, 2.0],
                  celeb_id=[1, 2, 3, 4, 65535])
    celebs = ["A", "Éva", "", "long name here"]
    write_mat(tmp_path / "ours.mat", fields, celebs)

    def cell(values):
        arr = np.empty((1, len(values)), dtype=object)
        for i, v in enumerate(values):
            arr[0, i] = v
        return arr

    dtypes = dict(dob=np.int32, photo_taken=np.uint16, gender=np.float64, face_score=np.float64,
                  second_face_score=np.float64, celeb_id=np.uint16)
    struct = {k: cell(v) if k not in dtypes else np.array([v], dtype=dtypes[k]) for k, v in fields.items()}
    order = ("dob", "photo_taken", "full_path", "gender", "name", "face_location", "face_score", "second_face_score",
             "celeb_names", "celeb_id")
    struct = {k: cell(celebs) if k == "celeb_names" else struct[k] for k in order}
    scipy.io.savemat(tmp_path / "scipy.mat", {"imdb": struct})
    ours, theirs = (tmp_path / "ours.mat").read_bytes(), (tmp_path / "scipy.mat").read_bytes()
    assert ours[:19] == theirs[:19] == b"MATLAB 5.0 MAT-file" and ours[116:] == theirs[116:]
    got = scipy.io.loadmat(tmp_path / "ours.mat")["imdb"][0, 0]
    assert [str(v[0]) if v.size else "" for v in got["name"][0]] == fields["name"]


@pytest.mark.parametrize("month, expected", [(1, 30), (6, 30), (7, 29), (12, 29)])
def test_mid_year_rule(month, expected):
    assert pp.age_at_photo(matlab_datenum(dt.date(1970, month, 15)), np.uint16(2000)) == expected


def test_uint16_year_does_not_wrap():
    # np.uint16(2000) - 2010 wraps to 65526 in numpy 2: the rule must give -10 (then dropped)
    assert pp.age_at_photo(matlab_datenum(dt.date(2010, 1, 1)), np.uint16(2000)) == -10


def test_every_filter_counts_its_drops(tmp_path):
    base = dict(dob=dt.date(1970, 1, 1), taken=2000)
    rows = [dict(base), dict(base, score=-np.inf), dict(base, score=0.5), dict(base, second=2.0),
            dict(base, gender=np.nan), dict(base, dob=dt.date(2005, 1, 1)), dict(base, dob=dt.date(1890, 1, 1)),
            dict(base, exists=False), dict(base, gender=0.0)]
    mat = make_mat(tmp_path, rows)
    _, meta = pp.load_meta(mat)
    ages, keep, dropped = pp.filter_meta(meta, tmp_path, 1.0, 0, 100)
    assert list(np.flatnonzero(keep)) == [0, 8]
    assert dropped == dict(face_score=2, second_face=1, gender_unknown=1, age_out_of_range=2, missing_file=1)
    assert ages[5] == -5 and ages[6] == 110


def test_cap_is_seeded_and_capped():
    ages = np.array([20] * 50 + [30] * 5 + [40] * 12)
    keep = np.ones(len(ages), bool)
    keep[0] = False
    a = pp.cap_per_age(ages, keep, 10, seed=1)
    assert np.bincount(ages[a]).tolist()[20] == 10 and (ages[a] == 30).sum() == 5 and (ages[a] == 40).sum() == 10
    assert 0 not in a
    assert np.array_equal(a, pp.cap_per_age(ages, keep, 10, seed=1))
    assert not np.array_equal(a, pp.cap_per_age(ages, keep, 10, seed=2))


def test_identity_split_keeps_people_on_one_side():
    ident = np.repeat(np.arange(200).astype(str), 5)
    source = np.array([f"{i % 100:02d}/photo{i}.jpg" for i in range(len(ident))])
    s = pp.assign_split(ident, source, "identity", 0.2, seed=3)
    for person in np.unique(ident):
        assert len(set(s[ident == person])) == 1
    assert 0.1 < (s == "valid").mean() < 0.3
    assert np.array_equal(s, pp.assign_split(ident, source, "identity", 0.2, seed=3))
    assert not np.array_equal(s, pp.assign_split(ident, source, "identity", 0.2, seed=4))
    img = pp.assign_split(ident, source, "image", 0.2, seed=3)
    assert any(len(set(img[ident == p])) == 2 for p in np.unique(ident))  # photo split mixes people
    assert 0.1 < (img == "valid").mean() < 0.3


@pytest.mark.parametrize("mode", ["identity", "image"])
def test_split_ignores_the_rest_of_the_selection(mode):
    """Removing people (another --per-age, --limit, --min-face-score) moves nobody else across the split."""
    rng = np.random.default_rng(0)
    ident = np.repeat(np.arange(1000).astype(str), 3)
    source = np.array([f"{i % 100:02d}/nm{p}_rm{i}.jpg" for i, p in enumerate(ident)])
    full = pp.assign_split(ident, source, mode, 0.1, seed=42)
    assert 0.07 < (full == "valid").mean() < 0.13  # --valid-fraction, approximately
    for kept in (ident != "17",  # one person fewer
                 rng.random(len(ident)) < 0.6,  # a smaller cap: some photos of many people
                 np.arange(len(ident)) < 1500):  # --limit
        part = pp.assign_split(ident[kept], source[kept], mode, 0.1, seed=42)
        assert np.array_equal(part, full[kept])


def test_wiki_identity_from_file_name(tmp_path):
    fields = dict(dob=np.array([[matlab_datenum(dt.date(1981, 5, 5))]], np.int32),
                  photo_taken=np.array([[2009]], np.uint16), full_path=np.array([["17/10000217_1981-05-05_2009.jpg"]], dtype=object),
                  gender=np.array([[0.0]]), face_score=np.array([[2.0]]), second_face_score=np.array([[np.nan]]))
    import scipy.io
    scipy.io.savemat(tmp_path / "wiki.mat", {"wiki": fields})
    name, meta = pp.load_meta(pp.find_mat(tmp_path, None))
    assert name == "wiki" and meta.identity.tolist() == ["10000217"]
    assert pp.age_at_photo(meta.dob[0], meta.photo_taken[0]) == 28


def test_bad_root_and_missing_field(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        pp.find_mat(tmp_path / "nope", None)
    with pytest.raises(UserError, match="no imdb.mat or wiki.mat"):
        pp.find_mat(tmp_path, None)
    import scipy.io
    scipy.io.savemat(tmp_path / "imdb.mat", {"imdb": dict(dob=np.array([[1]]), photo_taken=np.array([[2000]]))})
    with pytest.raises(UserError, match="lacks the field 'full_path'"):
        pp.load_meta(tmp_path / "imdb.mat")
    (tmp_path / "imdb.mat").write_bytes((tmp_path / "imdb.mat").read_bytes()[:100])
    with pytest.raises(UserError, match="cannot be read"):
        pp.load_meta(tmp_path / "imdb.mat")


def test_a_celeb_id_of_another_length_is_refused(tmp_path):
    """celeb_id is the split's identity: one entry more or less would pair every later photo with another person."""
    import scipy.io

    mat = make_mat(tmp_path, [dict(dob=dt.date(1970, 3, 1), taken=2000, cid=2)] * 3)
    struct = scipy.io.loadmat(mat)["imdb"]
    struct[0, 0]["celeb_id"] = struct[0, 0]["celeb_id"][:, :2]
    scipy.io.savemat(mat, {"imdb": struct})
    with pytest.raises(UserError, match="field 'celeb_id' has 2 entries, full_path has 3"):
        pp.load_meta(mat)


def test_a_struct_out_of_layout_is_one_line_and_a_broken_date_an_age_out_of_range(tmp_path):
    """An empty struct or an empty full_path cell raised an IndexError; a birth date past year 9999 a ValueError
    for the whole run."""
    import scipy.io

    scipy.io.savemat(tmp_path / "imdb.mat", {"imdb": np.zeros((0, 0))})
    with pytest.raises(UserError, match=r"imdb.mat: struct 'imdb' is not in imdb.mat's layout \(IndexError"):
        pp.load_meta(tmp_path / "imdb.mat")
    mat = make_mat(tmp_path, [dict(dob=dt.date(1970, 3, 1), taken=2000, cid=2)] * 2)
    struct = scipy.io.loadmat(mat)["imdb"]
    struct[0, 0]["full_path"][0, 1] = np.zeros((0,), dtype="<U1")  # an empty cell
    scipy.io.savemat(mat, {"imdb": struct})
    with pytest.raises(UserError, match="is not in imdb.mat's layout"):
        pp.load_meta(mat)
    assert pp.age_at_photo(4_000_000, 2000) < 0  # year 10951: out of any age range, and the run goes on
