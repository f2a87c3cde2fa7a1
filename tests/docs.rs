//! The Markdown files link to each other: every relative link must name a
//! file that exists, and every `#anchor` a heading of the file it points at
//! (GitHub's slugs). External links (with a scheme) are not followed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const SKIPPED_DIRS: &[&str] = &[".git", "target", "node_modules"];

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !SKIPPED_DIRS.contains(&name.as_ref()) {
                markdown_files(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// Text outside fenced code blocks and inline code spans, where links count.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut in_code = false;
        for ch in line.chars() {
            if ch == '`' {
                in_code = !in_code;
            } else if !in_code {
                out.push(ch);
            }
        }
        out.push('\n');
    }
    out
}

/// The targets of `[text](target)` links.
fn link_targets(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut targets = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        match after.find(')') {
            Some(end) => {
                let target = after[..end].split_whitespace().next().unwrap_or("");
                targets.push(target.to_string());
                rest = &after[end..];
            }
            None => break,
        }
    }
    targets
}

/// GitHub's heading anchor: lower case, punctuation dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|ch| match ch {
            ' ' => Some('-'),
            '-' | '_' => Some(ch),
            ch if ch.is_alphanumeric() => Some(ch),
            _ => None,
        })
        .collect()
}

/// The anchors of a file's headings (outside fenced blocks). A heading's
/// inline code counts: GitHub keeps its text in the anchor.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    text.lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced && line.starts_with('#')
        })
        .map(|line| slug(line.trim_start_matches('#')))
        .collect()
}

/// The broken links of one file, as `target: why`.
fn broken_links(file: &Path, text: &str) -> Vec<String> {
    let mut broken = Vec::new();
    for target in link_targets(text) {
        if target.is_empty() {
            broken.push("(empty link)".to_string());
            continue;
        }
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (target.as_str(), None),
        };
        // A bare `#anchor` points into the text being checked.
        let linked_text = if path.is_empty() {
            text.to_string()
        } else {
            let linked = file.parent().unwrap_or(Path::new(".")).join(path);
            if !linked.exists() {
                broken.push(format!("{target}: no such file"));
                continue;
            }
            std::fs::read_to_string(&linked).unwrap_or_default()
        };
        if let Some(anchor) = anchor
            && !anchors(&linked_text).contains(anchor)
        {
            broken.push(format!("{target}: no heading #{anchor}"));
        }
    }
    broken
}

#[test]
fn every_relative_link_in_the_markdown_files_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    markdown_files(root, &mut files);
    files.sort();
    assert!(
        files.iter().any(|file| file.ends_with("README.md")) && files.len() > 5,
        "found only {files:?}"
    );
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        checked += link_targets(&text).len();
        for problem in broken_links(file, &text) {
            problems.push(format!(
                "{}: {problem}",
                file.strip_prefix(root).unwrap_or(file).display()
            ));
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: is the parser broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_finds_a_missing_file_a_missing_heading_and_ignores_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = root.join("README.md");
    let text = "# Top heading\n\
        [ok](docs/rules.md) [ok](#top-heading) [ok](docs/restores.md#group-ordering) [web](https://example.com)\n\
        [gone](docs/no-such-page.md) [bad anchor](docs/rules.md#no-such-heading) [bad local](#nowhere)\n\
        `[in code](nowhere.md)`\n```\n[in a fence](nowhere.md)\n```\n";
    let broken = broken_links(&file, text);
    assert_eq!(
        broken,
        vec![
            "docs/no-such-page.md: no such file".to_string(),
            "docs/rules.md#no-such-heading: no heading #no-such-heading".to_string(),
            "#nowhere: no heading #nowhere".to_string(),
        ]
    );
}

#[test]
fn slugs_follow_github() {
    assert!(
        anchors("### The vCenter stand-in (`make e2e-vcenter`)\n")
            .contains("the-vcenter-stand-in-make-e2e-vcenter")
    );
    assert_eq!(
        slug("When the Restore cannot be read: fail closed"),
        "when-the-restore-cannot-be-read-fail-closed"
    );
    assert_eq!(
        slug("failurePolicy: Fail (default) or Ignore"),
        "failurepolicy-fail-default-or-ignore"
    );
    assert_eq!(
        slug("Compatibility with VM Operator"),
        "compatibility-with-vm-operator"
    );
}
