import pickle

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from transformers import AutoTokenizer

import perturbgen_hf  # noqa: F401  (registers AutoTokenizer)
from perturbgen_hf.tokenization import PerturbGenTokenizer, load_dictionary_pickle
from perturbgen_hf.tokenization.tokenization_perturbgen import pad_ranked


GENES = [f"ENSG{i:011d}" for i in range(1, 13)]
SYMBOLS = ["IL1B", "TNF", "EGR1", "CCL5", "CXCL10", "ACTB", "GAPDH", "MX1", "ISG15", "IFIT1", "RSAD2", "CD14"]


@pytest.fixture
def tokenizer():
    medians = np.linspace(0.5, 3.0, len(GENES))
    return PerturbGenTokenizer.from_vocabulary(
        GENES, medians, symbols=SYMBOLS, aliases={"IL-1B": GENES[0]}, model_max_length=8
    )


def reference_tokens(row, gene_ids, tokenizer, max_genes, total=None):
    """Geneformer's per-cell procedure, written independently: normalise, divide by median, sort, truncate."""
    total = row.sum() if total is None else total
    pairs = []
    for gene, value in zip(gene_ids, row):
        resolved = tokenizer.resolve_gene(gene)
        if value > 0 and resolved is not None:
            pairs.append((-(value / total * 10_000 / tokenizer.gene_medians[resolved]), tokenizer.vocab[resolved]))
    return [2, *[token for _, token in sorted(pairs)[:max_genes]], 3]


def test_rank_value_encoding_matches_a_direct_computation(tokenizer):
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(20, 12)) * rng.integers(0, 2, size=(20, 12))
    counts[3] = 0  # an empty cell
    counts[4, :4] = 5  # ties broken by token id
    batch = tokenizer(counts, gene_ids=GENES, padding=True)
    for i in range(20):
        expected = reference_tokens(counts[i], GENES, tokenizer, 6)
        assert batch["input_ids"][i][: len(expected)].tolist() == expected
        assert batch["attention_mask"][i].sum() == len(expected)


def test_near_ties_rank_by_value_and_exact_ties_by_token():
    genes = ["G0", "G1", "G2", "G3", "G4"]
    # G0 and G1 differ by 1e-13 relative: the packed sort key cannot see that, the exact fallback must.
    medians = [1.0 * (1 + 1e-13), 1.0, 2.0, 2.0, 3.0]
    tok = PerturbGenTokenizer.from_vocabulary(genes, medians)
    counts = np.array([[5, 5, 7, 7, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    ranked = tok.rank_cells(counts, genes)
    # G2, G3 tie exactly (token order); G1 (smaller median) beats G0 although its token id is larger.
    assert ranked.cell(0).tolist() == [2, 5, 4, 6, 7, 8, 3]
    assert ranked.cell(1).tolist() == [2, 3]  # an empty cell
    assert ranked.cell(2).tolist() == [2, 4, 3]
    assert ranked.cell(3).tolist() == [2, 3]  # a trailing empty cell


@pytest.mark.parametrize("max_length", [4096, 40])
def test_fast_ranking_kernel_matches_a_per_cell_lexsort(max_length):
    # A 20,000-gene vocabulary (15-bit token ids) and ragged rows: empty cells, truncated cells, stored zeros,
    # columns outside the vocabulary, and near ties (a median pair 1e-12 apart) that the packed keys cannot see.
    rng = np.random.default_rng(5)
    num_genes, num_cells = 20_000, 300
    genes = [f"ENSG{i:011d}" for i in range(num_genes)]
    medians = rng.uniform(0.5, 5.0, num_genes)
    medians[1:100:2] = medians[0:100:2] * (1 - 1e-12)  # the larger token id, the larger value
    tok = PerturbGenTokenizer.from_vocabulary(genes, medians, model_max_length=max_length)
    per_row = rng.integers(0, 400, num_cells)
    per_row[::37] = 0
    rows = [np.sort(rng.choice(num_genes + 10, n, replace=False)) for n in per_row]
    values = [rng.integers(0, 6, n).astype(np.float32) for n in per_row]  # zeros stored
    indptr = np.concatenate([[0], np.cumsum(per_row)])
    counts = sp.csr_matrix((np.concatenate(values), np.concatenate(rows), indptr), shape=(num_cells, num_genes + 10))
    counts = counts.tolil()
    counts[::5, :2] = 3  # cells whose near-tie pair has the same count
    counts = sp.csr_matrix(counts)
    before = counts.data.copy()
    gene_ids = [*genes, *[f"NOT_A_GENE{i}" for i in range(10)]]
    ranked = tok.rank_cells(counts, gene_ids, chunk_size=64)
    assert np.array_equal(counts.data, before)  # the input is read, not modified
    token_of = np.array([tok.vocab[g] for g in genes])
    for i in range(num_cells):
        row = counts[i]
        data, columns = row.data.astype(np.float64), row.indices
        total = data.sum()
        keep = (columns < num_genes) & (data > 0)
        data, columns = data[keep], columns[keep]
        value = data / (total if total > 0 else 1.0) * 10_000 / medians[columns]
        tokens = token_of[columns]
        expected = tokens[np.lexsort((tokens, -value))][: max_length - 2]
        assert ranked.cell(i).tolist() == [2, *expected.tolist(), 3], i


def test_chunks_and_processes_give_the_same_tokens(tokenizer):
    counts = sp.random(300, 12, density=0.5, random_state=3, format="csr")
    counts.data = np.ceil(counts.data * 20)
    whole = tokenizer.rank_cells(counts, GENES, chunk_size=1000)
    for chunk_size, num_proc in ((7, 1), (50, 2)):
        other = tokenizer.rank_cells(counts, GENES, chunk_size=chunk_size, num_proc=num_proc)
        assert np.array_equal(other.offsets, whole.offsets)
        assert np.array_equal(other.tokens, whole.tokens)


def test_parallel_chunks_stop_cleanly_when_the_consumer_stops():
    from perturbgen_hf.tokenization.chunking import map_row_chunks

    counts = sp.random(3000, 20, density=0.2, format="csr", random_state=0)
    for index, _ in enumerate(map_row_chunks(counts, lambda i, block: block.shape[0], 100, num_proc=2)):
        if index == 2:
            break  # must not hang the pool
    assert sum(map_row_chunks(counts, lambda i, block: block.shape[0], 100, num_proc=2)) == 3000
    assert [i for i, _ in map_row_chunks(counts, lambda i, block: (i, 0), 700, num_proc=2)] == [0, 1, 2, 3, 4]


def test_inputs_sparse_dense_anndata_and_backed(tokenizer, tmp_path):
    rng = np.random.default_rng(1)
    counts = rng.poisson(1.5, size=(30, 12)).astype(np.float32)
    dense = tokenizer(counts, gene_ids=GENES, padding=True)["input_ids"]
    assert np.array_equal(tokenizer(sp.csr_matrix(counts), gene_ids=GENES, padding=True)["input_ids"], dense)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = SYMBOLS  # symbols resolve too
    assert np.array_equal(tokenizer(adata, padding=True)["input_ids"], dense)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    assert np.array_equal(tokenizer(backed, padding=True, return_tensors="pt")["input_ids"].numpy(), dense)
    # A backed file read by two processes, each reopening it.
    ranked = tokenizer.rank_cells(backed.X, SYMBOLS, max_length=8, chunk_size=4, num_proc=2)
    assert np.array_equal(pad_ranked(ranked, dense.shape[1], 0)[0], dense)


def test_total_counts_option(tokenizer):
    counts = np.array([[4, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 95]], dtype=float)
    gene_ids = [*GENES, "NOT_A_GENE"]
    a = PerturbGenTokenizer.from_vocabulary(GENES, np.ones(12), total_counts="all")
    b = PerturbGenTokenizer.from_vocabulary(GENES, np.ones(12), total_counts="vocabulary")
    # Ranks only depend on ratios within a cell, so the two agree on order; both are valid choices.
    assert a(counts, gene_ids=gene_ids)["input_ids"] == b(counts, gene_ids=gene_ids)["input_ids"]
    with pytest.raises(ValueError, match="total_counts"):
        PerturbGenTokenizer.from_vocabulary(GENES, np.ones(12), total_counts="some")


def test_duplicate_columns_are_summed(tokenizer):
    counts = np.array([[2, 2, 3]])
    ids = tokenizer(counts, gene_ids=[GENES[0], GENES[0], GENES[1]])["input_ids"][0]
    # summed, gene 0 has 4 counts / median 0.5 = 8 > gene 1: 3 / 0.73; one column alone (4) would lose
    assert ids == [2, 4, 5, 3]


@pytest.mark.parametrize(
    ("values", "message"),
    [([[1.5, 2]], "non-integer"), ([[-1, 2]], "negative"), ([[np.nan, 2]], "NaN")],
)
def test_bad_counts_are_refused(tokenizer, values, message):
    with pytest.raises(ValueError, match=message):
        tokenizer(np.array(values), gene_ids=GENES[:2])


def test_no_known_gene_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="None of the 2 input genes"):
        tokenizer(np.ones((1, 2)), gene_ids=["FOO", "BAR"])


def test_missing_genes_are_reported_once(tokenizer, caplog):
    caplog.set_level("WARNING")
    tokenizer(np.ones((2, 3)), gene_ids=[GENES[0], "FOO", ""])
    tokenizer(np.ones((2, 3)), gene_ids=[GENES[0], "FOO", ""])
    messages = [r.message for r in caplog.records if "not used" in r.message]
    assert len(messages) == 1
    assert "1 are not in the tokenizer's vocabulary (e.g. FOO) and 1 have no identifier" in messages[0]


def test_gene_lookup(tokenizer):
    assert tokenizer.gene_to_id("il1b") == 4
    assert tokenizer.gene_to_id("IL-1B") == 4
    assert tokenizer.gene_to_id(GENES[1].lower() + ".7") == 5  # versioned Ensembl id
    assert tokenizer.id_to_gene(4) == GENES[0]
    assert tokenizer.id_to_symbol(5) == "TNF"
    with pytest.raises(KeyError, match=r"'IL1BB'.*did you mean IL1B"):
        tokenizer.gene_to_id("IL1BB")


def test_save_load_and_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.set_target_genes(["TNF", "IL1B", "MX1"], condition_tokens=["donor=A"])
    tokenizer.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "gene_medians.json",
        "gene_names.json",
        "target_vocab.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is PerturbGenTokenizer
    counts = np.random.default_rng(2).poisson(2.0, size=(5, 12))
    assert loaded(counts, gene_ids=GENES)["input_ids"] == tokenizer(counts, gene_ids=GENES)["input_ids"]
    assert loaded.target_genes == [GENES[1], GENES[0], GENES[7]]
    assert loaded.condition_token_id("donor=A") == 4 + 3
    assert loaded.gene_to_id("TNF") == 5


def test_target_encoding_and_counts(tokenizer):
    tokenizer.set_target_genes(["TNF", "IL1B", "MX1"])
    counts = np.array([[0, 9, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]])
    ranked = tokenizer.rank_targets(counts, GENES)
    # cell 0: TNF (decoder 4) 9/0.73 beats MX1 (decoder 6) 4/2.09; cell 1: only IL1B (decoder 5) is a target
    assert ranked.cell(0).tolist() == [4, 6]
    assert ranked.cell(1).tolist() == [5]
    assert tokenizer.target_counts(counts, GENES).toarray().tolist() == [[9, 0, 4], [0, 3, 0]]
    with pytest.raises(KeyError, match="NOPE"):
        tokenizer.set_target_genes(["TNF", "NOPE"])


def test_model_compatibility_check(tokenizer):
    from conftest import tiny_config

    tokenizer.set_target_genes(["TNF", "IL1B"])
    tokenizer.check_model_compatibility(
        tiny_config(target_genes=tokenizer.target_genes, num_target_genes=2, condition_tokens=[])
    )
    with pytest.raises(ValueError, match="Target genes differ"):
        tokenizer.check_model_compatibility(
            tiny_config(target_genes=[GENES[0], GENES[1]], num_target_genes=2, condition_tokens=[])
        )
    with pytest.raises(ValueError, match="Condition tokens differ"):
        tokenizer.check_model_compatibility(tiny_config(target_genes=tokenizer.target_genes, num_target_genes=2))


def test_fit_computes_nonzero_medians():
    counts = np.array([[10, 0, 0], [0, 5, 5], [30, 10, 0], [0, 0, 0]])
    fitted = PerturbGenTokenizer.fit(counts, ["A", "B", "C"], symbols=["a", "b", "c"])
    # normalised per 10k: A = 10,000 and 7,500 -> 8,750; B = 5,000 and 2,500 -> 3,750; C = 5,000
    assert fitted.gene_medians == {"A": 8750.0, "B": 3750.0, "C": 5000.0}
    assert fitted.gene_to_id("b") == 5
    with pytest.raises(ValueError, match="empty"):
        PerturbGenTokenizer.fit(np.zeros((0, 3)), ["A", "B", "C"])
    # Two columns naming one gene are one gene, with their counts summed.
    merged = PerturbGenTokenizer.fit(counts, ["A", "B", "A"], symbols=["a", "b", "a2"])
    # A = columns 1 + 3: 10/10, 5/10 and 30/40 per 10k -> 10,000, 5,000, 7,500 -> median 7,500
    assert merged.gene_medians == {"A": 7500.0, "B": 3750.0}
    assert merged.vocab_size == 6


def test_original_dictionaries_through_the_restricted_unpickler(shared_data):
    vocab = shared_data / "vocab"
    tok = PerturbGenTokenizer.from_dictionaries(
        vocab / "perturbgen_token_dict_gftokens_gc95M.pkl",
        vocab / "perturbgen_gene_median_dict_gftokens_gc95M.pkl",
        vocab / "perturbgen_ensembl_mapping_dict_gc95M.pkl",
        gene_names=vocab / "geneformer_gc30M_gene_name_id_dict.pkl",
    )
    assert tok.vocab_size == 18967
    assert tok.gene_to_id("IL1B") == tok.gene_to_id("ENSG00000125538") == 1977
    assert tok.gene_to_id("gapdh") == 8378
    assert tok.id_to_symbol(1977) == "IL1B"
    assert tok.gene_medians["ENSG00000125538"] == pytest.approx(4.2012, abs=1e-4)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ENSG1": _Exploit()}))
    with pytest.raises(ValueError, match=r"refusing to load builtins\.print"):
        load_dictionary_pickle(path)
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a dict"):
        load_dictionary_pickle(tmp_path / "list.pkl")
    with pytest.raises(FileNotFoundError, match=r"missing\.pkl"):
        load_dictionary_pickle(tmp_path / "missing.pkl")


def test_padding_follows_the_transformers_convention(tokenizer):
    counts = np.array([[5, 1, 0, 0], [1, 1, 1, 1]])  # 2 and 4 genes
    plain = tokenizer(counts, gene_ids=GENES[:4])
    assert [len(ids) for ids in plain["input_ids"]] == [4, 6]  # unpadded lists, <cls> ... <eos>
    assert plain["attention_mask"] == [[1] * 4, [1] * 6]
    padded = tokenizer(counts, gene_ids=GENES[:4], padding=True, return_tensors="np")
    assert padded["input_ids"].shape == (2, 6) and padded["input_ids"][0, 4:].tolist() == [0, 0]
    assert [row.tolist() for row in padded["input_ids"]] == [ids + [0] * (6 - len(ids)) for ids in plain["input_ids"]]
    assert tokenizer(counts, gene_ids=GENES[:4], padding="max_length", max_length=8)["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="padding=True"):
        tokenizer(counts, gene_ids=GENES[:4], return_tensors="pt")
    with pytest.raises(ValueError, match="padding must be"):
        tokenizer(counts, gene_ids=GENES[:4], padding="left")
