//! `rules`: the rules as a Markdown table, the one in `docs/rules.md` (a test
//! keeps the two in step).

use crate::vmop;

pub fn table() -> String {
    let mut out = String::from("| rule id | object | change | why |\n|---|---|---|---|\n");
    for doc in vmop::rule_docs() {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            doc.id, doc.kind, doc.what, doc.why
        ));
    }
    out
}
